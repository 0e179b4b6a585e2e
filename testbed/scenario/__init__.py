"""Scenarios: experiments written down once (scenarios/*.yaml, documented in scenarios/README.md).

units.py and syntax.py parse the values and the small languages inside strings, actions.py and
model.py are the file's models, checks.py the checks that need the whole file, loader.py reads
a file (every problem as file:line: field.path: message), plan.py places the timeline in time.
"""
