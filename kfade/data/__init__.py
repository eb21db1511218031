"""Data layer: benchmark loaders (TOFU, WMDP, embedded mini versions), QA formatting and label masking."""
