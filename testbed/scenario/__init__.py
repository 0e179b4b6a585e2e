"""Scenarios: experiments written down once (scenarios/*.yaml, documented in scenarios/README.md).

units.py and syntax.py parse the values and the small languages inside strings, actions.py and
model.py are the file's models, checks.py the checks that need the whole file, loader.py reads
a file (every problem as file:line: field.path: message), plan.py places the timeline in time.

Playing and judging a run (docs/scenario-report.md): traffic.py starts the traffic generators
(probe.py and wire.py, processes inside the sources' namespaces), records.py reads their
requests, assertions.py and convergence.py judge them, report.py and plot.py write the report,
progress.py shows the run.
"""
