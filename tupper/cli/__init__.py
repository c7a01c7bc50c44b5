"""The command line: arguments in, tables and JSON out, errors to exit codes; the fast D-Bus client of tupperd."""
