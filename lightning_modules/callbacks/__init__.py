"""Everything outside the training step: EMA, sample grids, order maps, FID/IS, data statistics."""
