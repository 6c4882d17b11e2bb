"""pipeline.cluster.connect: which Ray jobs get a runtime_env (issue 14's fixed cost per stage).

A runtime_env on a job, task or actor makes Ray start a fresh worker process for it instead of
taking one the node prestarted, so `connect` sends the package's environment (job_env) only to
clusters whose processes do not already have it. ray.init is replaced: no Ray starts here.
"""

from __future__ import annotations

import pytest

from pipeline import cluster, environment


@pytest.fixture
def fake_init(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("PIPELINE_VERBOSE", raising=False)
    monkeypatch.setenv("RAY_TRAIN_COLLECTIVE_TIMEOUT_S", "99")     # a Ray Train setting the user exported
    monkeypatch.setattr(cluster, "running_cluster", lambda: None)
    return calls


def state_with(env: dict) -> dict:
    return {"address": "127.0.0.1:6380", "env": env}


def test_job_env_holds_the_package_settings_and_the_users_ray_train_ones(fake_init):
    env = cluster.job_env()
    assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2" and env["RAY_AUTH_MODE"] == "disabled"
    assert env["RAY_TRAIN_COLLECTIVE_TIMEOUT_S"] == "99" and env["RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"] == "0"
    assert "PATH" not in env and "HOME" not in env


def test_local_ray_inherits_this_environment(fake_init):
    started, where = cluster.connect(num_cpus=2)
    (kwargs,) = fake_init
    assert started and "local Ray" in where
    assert kwargs["address"] == "local" and "runtime_env" not in kwargs
    assert cluster.workers_inherit_env()


def test_joining_cluster_up_with_the_same_environment_sends_none(fake_init, monkeypatch):
    monkeypatch.setattr(cluster, "running_cluster", lambda: state_with({**cluster.job_env(), "RAY_TRAIN_X": "1"}))
    started, where = cluster.connect()
    (kwargs,) = fake_init
    assert started and "pipeline cluster up" in where
    assert kwargs["address"] == "127.0.0.1:6380" and "runtime_env" not in kwargs
    assert cluster.workers_inherit_env()


@pytest.mark.parametrize("node_env", [
    {},                                                        # a state file from before the field
    {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"},               # another value on the nodes
])
def test_joining_cluster_up_with_another_environment_sends_it(fake_init, monkeypatch, node_env):
    monkeypatch.setattr(cluster, "running_cluster", lambda: state_with({**cluster.job_env(), **node_env}
                                                                        if node_env else {}))
    cluster.connect()
    (kwargs,) = fake_init
    assert kwargs["runtime_env"] == {"env_vars": cluster.job_env()}
    assert not cluster.workers_inherit_env()


def test_any_other_cluster_gets_the_environment(fake_init, monkeypatch):
    monkeypatch.setattr(cluster, "running_cluster", lambda: state_with(cluster.job_env()))
    cluster.connect("10.0.0.5:6379")
    (kwargs,) = fake_init
    assert kwargs["address"] == "10.0.0.5:6379" and kwargs["runtime_env"] == {"env_vars": cluster.job_env()}
    assert not cluster.workers_inherit_env()


def test_ray_already_running_in_this_process_is_not_ours_to_judge(fake_init):
    fake_init.append({})                     # ray.is_initialized() is now True
    assert cluster.connect() == (False, "the Ray instance this process already uses")
    assert not cluster.workers_inherit_env()


def test_cluster_up_nodes_get_and_record_the_job_environment(monkeypatch, tmp_path):
    from pipeline import console

    monkeypatch.delenv("PIPELINE_VERBOSE", raising=False)
    for key in console.QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    node = cluster._node_env()
    assert {**environment.DEFAULTS, **console.QUIET_ENV}.items() <= node.items()
