"""A random-access source must hold examples, not batches: jaxdl batches a source itself."""
import grain
import numpy as np
import pytest

from jaxdl import MLP, data, evaluate, fit
from tests.support.toy_data import CE, blobs


def grain_examples(n=24):
    x, y = blobs(n=n)
    return grain.MapDataset.source([{"image": row, "label": label} for row, label in zip(x, y)])


def test_a_grain_dataset_batched_by_the_user_is_refused_naming_its_batch_size():
    batched = grain_examples().batch(4)
    assert len(batched) == 6 and batched[0]["image"].shape == (4, 3)  # what jaxdl would read as one example
    message = (r"the source is a grain dataset already batched \(\.batch\(4\)\): each of its 6 items is a batch of "
               r"4 examples, but jaxdl batches a source itself \(batch_size=8\) and reads it example by example; "
               r"drop the \.batch\(\)")
    for run in (lambda: fit(MLP(features=(4,), num_outputs=3), batched, loss=CE, batch_size=8, verbose=0),
                lambda: data.as_batches(batched, batch_size=8)):
        with pytest.raises(ValueError, match=message):
            run()
    # The batches the message suggests to keep train as they are: 6 steps of 4 examples.
    own = batched.map(lambda batch: {"x": batch["image"], "y": batch["label"]}).to_iter_dataset()
    state, history = fit(MLP(features=(4,), num_outputs=3), own, loss=CE, epochs=1, verbose=0)
    assert int(state.step) == 6 and len(history["loss"]) == 1
    # Found through later steps of the pipeline too (a map, a shuffle after the batch).
    with pytest.raises(ValueError, match=r"already batched \(\.batch\(4\)\)"):
        data.as_batches(grain_examples().batch(4).shuffle(seed=0).map(lambda batch: batch), batch_size=8)


def test_unbatched_grain_datasets_and_a_batch_shaped_example_with_a_known_input_shape():
    state, _ = fit(MLP(features=(4,), num_outputs=3), grain_examples().shuffle(seed=1), loss=CE, batch_size=8,
                   epochs=1, verbose=0)
    stacked = [{"image": np.zeros((4, 3), np.float32), "label": np.zeros(4, np.int64)}] * 5  # not grain
    with pytest.raises(ValueError, match=r"feature 'image' has shape \(4, 3\) per example, but the model takes "
                                         r"\(3,\): a batch of 4 examples\? jaxdl batches a source itself"):
        evaluate(state, stacked, loss=CE, batch_size=8)
