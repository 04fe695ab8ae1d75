def layer_norm(*args, **kwargs):  # placeholder until the kernel lands
    raise NotImplementedError("layer_norm kernel not written yet")
