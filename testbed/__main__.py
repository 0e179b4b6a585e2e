from testbed.cli.main import cli

cli()
