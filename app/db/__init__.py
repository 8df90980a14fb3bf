"""Database models and sessions of the service (SQLAlchemy 2.0, PostgreSQL or SQLite)."""
