"""The `harden` command line: local hardening commands and the REST service client."""
