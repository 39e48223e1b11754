"""fedimg: turn a cloud image into tested, public AMIs in every EC2 region and flavour."""

__version__ = "3.0.0.dev0"
