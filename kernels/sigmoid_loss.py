def sigmoid_loss(*args, **kwargs):  # placeholder until the kernel lands
    raise NotImplementedError("sigmoid_loss kernel not written yet")
