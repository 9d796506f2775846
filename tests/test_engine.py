"""The training loop's monitor: losses read at the logging rhythm (one host-device synchronisation per read), a
diverged loss named by the iteration where it stopped being finite, stop requests agreed on when read."""
import math

import pytest
import torch

import engine
import errors


class Stop:
    requested = False


def test_losses_are_read_every_few_steps_and_before_the_end_in_order():
    logged = []
    monitor = engine.Monitor(Stop(), lambda it, lr, loss: logged.append((it, loss)), every=4)
    for iteration in range(1, 7):
        monitor.step(iteration, 0.1, torch.tensor(float(iteration)), torch.tensor(10))
        assert len(logged) == (4 if iteration >= 4 else 0)  # nothing read between the rhythm's steps
    monitor.read()
    assert logged == [(i, float(i)) for i in range(1, 7)]


def test_a_loss_that_stopped_being_finite_is_named_by_its_own_iteration_when_read():
    logged = []
    monitor = engine.Monitor(Stop(), lambda it, lr, loss: logged.append(it), every=5)
    losses = [1.0, 2.0, math.nan, 3.0, math.inf]
    for iteration, loss in enumerate(losses[:4], 1):
        monitor.step(iteration, 0.1, torch.tensor(loss), torch.tensor(7 * iteration))
    with pytest.raises(engine.Diverged) as e:
        monitor.step(5, 0.1, torch.tensor(losses[4]), torch.tensor(0))
    assert (e.value.iteration, e.value.labelled) == (3, 21) and math.isnan(e.value.loss)
    assert logged == [1, 2]  # the steps before it were logged


def test_a_stop_request_is_acted_on_at_once_in_one_process_and_when_read():
    stop = Stop()
    monitor = engine.Monitor(stop, lambda *a: None, every=10)
    monitor.step(1, 0.1, torch.tensor(1.0), torch.tensor(1))
    stop.requested = True
    with pytest.raises(errors.Stopped):
        monitor.step(2, 0.1, torch.tensor(1.0), torch.tensor(1))
    logged = []
    stop.requested = False
    monitor = engine.Monitor(stop, lambda it, lr, loss: logged.append(it), every=10)
    monitor.step(1, 0.1, torch.tensor(1.0), torch.tensor(1))
    stop.requested = True
    monitor.read(stops=False)  # before saving an interruption checkpoint: reads the losses, does not raise
    assert logged == [1]
