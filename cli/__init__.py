"""The replay-migrate command line: argument parsing, the commands, text tables and progress."""
