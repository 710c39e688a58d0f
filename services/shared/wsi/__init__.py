"""Whole-slide-image format handling: TIFF structure parsing/writing and format inspection."""
