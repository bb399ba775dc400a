"""Bad inputs give one-line DatasetErrors naming the file (issue 13)."""
import json

import pytest

from dhr_cli.errors import DatasetError
from dhr_cli.io.datasets import open_dataset
from tests.helpers import make_flat


@pytest.mark.parametrize("bad", [[["cat"]], [1], "cat"])
def test_labels_json_with_non_string_labels_is_one_line(tmp_path, bad):
    root = make_flat(tmp_path / "ds")
    labels = json.loads((root / "labels.json").read_text())
    labels[next(iter(labels))] = bad
    (root / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(DatasetError) as e:
        open_dataset(root)
    assert "labels.json" in str(e.value) and "\n" not in str(e.value)
