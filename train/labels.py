"""Label of the positions that carry no loss (torch's ``cross_entropy`` default ``ignore_index``)."""

IGNORE = -100
