"""Dataset sources -> FFCV `.beton` files plus a `manifest.json` (`python -m beton_builders`)."""

# Bump when the layout of the betons or the manifest changes.
BUILDER_VERSION = 1
