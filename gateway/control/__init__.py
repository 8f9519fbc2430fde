"""The release-engineering API (ReleaseService) on its own port."""
