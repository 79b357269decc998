"""Review: the HTML report, `audit explain` figures, colour maps."""
