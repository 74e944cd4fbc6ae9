"""Fault injection on a whole local entraflow: scenarios that check final state, not survival."""
