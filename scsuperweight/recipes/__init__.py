"""Training recipes shipped with the package (JSON); `scsuperweight.train.load_recipe("demo")` reads them."""
