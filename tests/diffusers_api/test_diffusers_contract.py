"""The contract of diffusers' SchedulerCommonTest, kept here because CI has no diffusers checkout.

The full suite (tests/schedulers/test_schedulers.py::SchedulerCommonTest) is run against a checkout
before release; see the README.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from perflow_core import PerflowScheduler

MINIMAL_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def one_step(scheduler, index=0, return_dict=True):
    scheduler.set_timesteps(4)
    sample = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = scheduler.timesteps[index]
    return scheduler.step(0.1 * sample, t, sample, return_dict=return_dict)


def test_config_survives_save_and_reload_exactly(tmp_path):
    scheduler = PerflowScheduler(**MINIMAL_CONFIG)
    scheduler.save_config(tmp_path)
    reloaded = PerflowScheduler.from_pretrained(tmp_path)
    assert json.loads(json.dumps(dict(scheduler.config))) == dict(scheduler.config)
    assert torch.equal(one_step(scheduler).prev_sample, one_step(reloaded).prev_sample)


def test_tuple_output_equals_the_dataclass_output():
    scheduler = PerflowScheduler(**MINIMAL_CONFIG)
    as_dict = one_step(scheduler)
    as_tuple = one_step(scheduler, return_dict=False)
    assert all(torch.equal(a, b) for a, b in zip(as_dict.to_tuple(), as_tuple))


def test_two_consecutive_steps_keep_the_shape():
    scheduler = PerflowScheduler(**MINIMAL_CONFIG)
    scheduler.set_timesteps(4)
    sample = torch.rand(4, 3, 8, 8)
    for t in scheduler.timesteps[:2]:
        sample = scheduler.step(0.1 * sample, t, sample).prev_sample
    assert sample.shape == (4, 3, 8, 8)


def test_scale_model_input_works_before_set_timesteps_with_a_float_timestep():
    sample = torch.rand(2, 3)
    assert torch.equal(PerflowScheduler().scale_model_input(sample, 0.0), sample)


def test_add_noise_broadcasts_one_timestep_over_the_batch():
    scheduler = PerflowScheduler(**MINIMAL_CONFIG)
    scheduler.set_timesteps(50)
    sample = torch.rand(4, 3, 8, 8)
    assert scheduler.add_noise(sample, torch.randn_like(sample), scheduler.timesteps[5][None]).shape == sample.shape


def test_trained_betas_round_trip_as_float32(tmp_path):
    scheduler = PerflowScheduler(trained_betas=np.array([0.1, 0.3]))
    scheduler.save_config(tmp_path)
    assert PerflowScheduler.from_pretrained(tmp_path).betas.tolist() == scheduler.betas.tolist()


def test_trained_betas_of_the_wrong_length_cannot_sample():
    with pytest.raises(ValueError, match="trained_betas has 2 entries"):
        PerflowScheduler(trained_betas=[0.1, 0.3]).set_timesteps(4)


def test_compatible_schedulers_convert_back_keeping_shared_settings():
    scheduler = PerflowScheduler(**MINIMAL_CONFIG)
    ddim = DDIMScheduler.from_config(scheduler.config)
    back = PerflowScheduler.from_config(ddim.config)
    shared = set(scheduler.config) & set(ddim.config) - {"_use_default_values", "_class_name"}
    assert all(back.config[k] == scheduler.config[k] for k in shared)


def test_config_only_values_warn_and_missing_attributes_raise():
    scheduler = PerflowScheduler()
    with pytest.warns(FutureWarning):
        scheduler.num_train_timesteps
    with pytest.raises(AttributeError, match="'PerflowScheduler' object has no attribute 'does_not_exist'"):
        scheduler.does_not_exist
