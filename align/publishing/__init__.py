"""Publishing: `align publish`, the Hub folder, its model card and the push."""
