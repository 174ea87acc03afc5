"""The lab: train real networks with and without batch norm and test the claims made about it."""
