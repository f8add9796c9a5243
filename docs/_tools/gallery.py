"""Helpers of the examples gallery, named by string in conf.py so the configuration pickles."""


def reset_torch(gallery_conf, fname):
    """Before each example: one torch thread and float32 as the default dtype.

    The examples are small; on a shared 2-core machine two threads spend most of their time
    synchronizing (an L-BFGS step of a 31-parameter problem took 35 ms with two threads on a
    busy machine and 0.2 ms with one).
    """
    import torch

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
