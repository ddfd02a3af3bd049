"""pvhvm's fuzz targets (docs/fuzzing.md): each a short deterministic run in
the suite and a campaign command with a seed and a duration."""
