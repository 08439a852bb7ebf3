"""Pure loss functions of mSLAM pre-training, one module per objective."""
