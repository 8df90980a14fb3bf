"""HTTP routes; each module is a thin layer over `app.services` and `app.repository`."""
