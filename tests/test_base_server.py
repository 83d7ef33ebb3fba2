"""Issue 7: one base for several simulator workers, its calls batched (pld_core/base_server.py).

An untrained ACT (state only, LIBERO-Object's observation sizes, non-trivial normalisation stats,
3 actions used per 4-step chunk) stands in for a base; the checks are about what the server
computes, not about the policy's quality:

- two clients asking at the same steps are answered by one forward pass of batch 2, and each gets
  exactly what ``BasePolicy.act`` (LeRobot's ``select_action`` chunk queue) gives for its own
  observations, task and episode resets;
- an ``EpisodePool`` with 2 workers serving the base plays the same episodes as one process with its
  own copy, on real LIBERO;
- a policy that cannot be batched (temporal ensembling) is named as such.
"""

from __future__ import annotations

import json
import threading
from multiprocessing import Pipe
from pathlib import Path

import numpy as np
import pytest

from pld_core.base_policy import BasePolicy
from pld_core.base_server import BaseServer, RemoteBase, unbatchable
from pld_core.env import EnvSpec, env_state_dim

try:
    from builders import make_state_act as build_state_act
except ImportError:  # tests/ became a package
    from tests.builders import make_state_act as build_state_act

SUITE, MAX_OBJECTS = "libero_object", 3
ENV_DIM = env_state_dim(SUITE, MAX_OBJECTS)
N_ACTION_STEPS = 3


def make_state_act(path: Path, seed: int = 0, **cfg_overrides) -> Path:
    kw = dict(dim_model=32, n_heads=2, dim_feedforward=64, n_encoder_layers=1, n_decoder_layers=1, latent_dim=8, chunk_size=4,
              n_action_steps=N_ACTION_STEPS, use_vae=True,
              normalization_mapping={"VISUAL": "MEAN_STD", "STATE": "MEAN_STD", "ENV": "MEAN_STD", "ACTION": "MEAN_STD"})
    return build_state_act(path, env_dim=ENV_DIM, seed=seed, random_stats=True, **{**kw, **cfg_overrides})


@pytest.fixture(scope="module")
def act_ckpt(tmp_path_factory) -> Path:
    return make_state_act(tmp_path_factory.mktemp("act") / "pretrained_model")


class _Env:  # what RemoteBase.reset reads
    def __init__(self, language: str):
        self.language = language


def _observations(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"state": rng.normal(size=8).astype(np.float32), "env_state": rng.normal(size=ENV_DIM).astype(np.float32)}
            for _ in range(n)]


def test_two_clients_one_forward_pass_same_actions_as_select_action(act_ckpt):
    steps, reset_at = 8, 5  # a reset mid-chunk: the next step must ask for a new chunk
    tasks = [["pick up the soup", "pick up the cheese"], ["pick up the milk", "pick up the ketchup"]]
    obs = [_observations(1, steps), _observations(2, steps)]

    ref = BasePolicy.load(act_ckpt, "state", env_state_dim=ENV_DIM)
    want = []
    for c in range(2):
        acts = []
        ref.reset(tasks[c][0])
        for t in range(steps):
            if t == reset_at:
                ref.reset(tasks[c][1])
            acts.append(ref.act(obs[c][t]))
        want.append(np.stack(acts))
    assert ref.n_model_calls == 2 * 3  # per client: t = 0, 3, and 5 (the reset emptied the queue)
    served = BasePolicy.load(act_ckpt, "state", env_state_dim=ENV_DIM)
    ends = [Pipe() for _ in range(2)]
    server = BaseServer(served, [a for a, _ in ends], gather_s=5.0).start()  # long window: both requests always meet
    clients = [RemoteBase(b) for _, b in ends]
    got = [[], []]
    barrier = threading.Barrier(2)

    def run(c: int) -> None:
        clients[c].reset(_Env(tasks[c][0]))
        for t in range(steps):
            barrier.wait()
            if t == reset_at:
                clients[c].reset(_Env(tasks[c][1]))
            got[c].append(clients[c].act(obs[c][t]))

    threads = [threading.Thread(target=run, args=(c,)) for c in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    server.stop()  # before its pipe ends are closed: closing them under its wait() is a race, not a server error
    for a, _ in ends:
        a.close()
    assert server.error is None
    for c in range(2):
        np.testing.assert_allclose(np.stack(got[c]), want[c], atol=1e-5)
        assert clients[c].n_model_calls == 3
    assert server.batch_sizes == [2, 2, 2]  # one pass per chunk boundary, both clients in it


def test_unbatchable_policies_are_named(act_ckpt, tmp_path):
    assert unbatchable(BasePolicy.load(act_ckpt, "state", env_state_dim=ENV_DIM)) is None
    ens = make_state_act(tmp_path / "ens", temporal_ensemble_coeff=0.01, n_action_steps=1)
    cfg = json.loads((ens / "config.json").read_text())
    assert cfg["temporal_ensemble_coeff"] == 0.01
    assert "temporal ensembling" in unbatchable(BasePolicy.load(ens, "state", env_state_dim=ENV_DIM))


def test_pool_serving_the_base_plays_the_same_episodes(act_ckpt):
    from pld_core.parallel import EpisodePool, record_episode
    from pld_core.policies import make_policy_factory

    spec = EnvSpec(SUITE, 0, mode="state", max_objects=MAX_OBJECTS)
    factory = make_policy_factory(str(act_ckpt), mode="state")
    jobs = [(0, (i, 100 + i, 0.99)) for i in range(3)]
    with EpisodePool(spec, factory, workers=1, max_steps=12) as pool:
        local = list(pool.imap(record_episode, jobs))
    with EpisodePool(spec, factory, workers=2, max_steps=12, serve_base=factory) as pool:
        remote = list(pool.imap(record_episode, jobs))
        sizes = pool.base_batch_sizes
    assert sum(sizes) == 3 * 5  # 12 steps + the base action at the truncated final state, a chunk every 3: 5 per episode, all served here
    for (ok1, n1, e1), (ok2, n2, e2) in zip(local, remote):
        assert (ok1, n1) == (ok2, n2) == (False, 12)
        np.testing.assert_allclose(e2.steps["base_action"], e1.steps["base_action"], atol=1e-4)
        np.testing.assert_allclose(e2.steps["obs_state"], e1.steps["obs_state"], atol=1e-3)
