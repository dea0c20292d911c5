"""Storage: database URLs, the artifact folder beside a study's database, and trained weights in it."""
