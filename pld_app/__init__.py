"""The application: the `pld` command line and its reports (lineage table, pictures)."""
