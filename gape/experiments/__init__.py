"""Studies built on the package: each subpackage is one ``gape`` subcommand's experiment."""
