import pytest
import torch

import interp
from probes.toy import ToyLM


@pytest.fixture(scope="session")
def toy():
    torch.manual_seed(0)
    m = ToyLM()
    return m, interp.attach(m)
