"""Driving a whole local entraflow, shared by the demo, the tests, the benches and chaos."""
