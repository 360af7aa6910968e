"""Shared pytest set-up: fixtures live in plugin modules beside this file, one per concern."""

pytest_plugins = ["s3_fixtures", "mount_fixtures", "pg_fixtures", "posix_report"]
