"""Scenarios: scripted experiments with traffic, faults, assertions, a report and plots (`svclab run`)."""
