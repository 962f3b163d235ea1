"""MAX Engine: steer a big model from its residual stream while a small one watches."""
