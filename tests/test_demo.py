from icprune import demo
from icprune.graph import prunable_layers
from icprune.models import resnet18


def test_demo_prints_a_row_per_layer_and_a_summary(capsys):
    demo.main()
    out = capsys.readouterr().out
    layers = list(prunable_layers(resnet18()))
    rows = [line for line in out.splitlines() if line.split() and line.split()[0] in layers]
    assert [row.split()[0] for row in rows] == layers
    for row in rows:  # C, read point, four finite means, the overlap
        fields = row.split()
        assert fields[2] in ("output", "bn", "activation")
        assert all(float(v) >= 0 for v in fields[3:7])
        assert fields[7].endswith("%")
    assert "scored 20 layers, 4800 channels" in out
