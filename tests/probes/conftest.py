import pytest
import torch

import interp
from probes.toy import ToyLM

# Tiny models and many small solves: extra threads only contend with each other on a shared machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy():
    torch.manual_seed(0)
    m = ToyLM()
    return m, interp.attach(m)
