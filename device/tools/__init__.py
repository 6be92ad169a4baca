"""Operator commands (predict, evaluate, site-check, bench, capture, results/status, run) and their helpers; may import anything in device."""
