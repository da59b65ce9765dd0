"""The data engine: raw media -> decoded, filtered, deduplicated, scored, recaptioned webdataset shards."""
