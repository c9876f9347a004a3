"""What makes a line figure readable, read back from the matplotlib Figure itself: every series
told apart by colour and marker, the legends outside every axes, the reference rows in their own
style in every panel. Shared by the plot tests and the comparison's tests."""
from __future__ import annotations

from matplotlib.colors import to_hex


def line_styles(fig) -> dict[str, tuple[str, str, str, float]]:
    """{label: (colour, marker, line style, width)} over every axes; a label drawn in several
    panels must be drawn the same way in each."""
    styles: dict[str, tuple[str, str, str, float]] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            style = (to_hex(line.get_color()), line.get_marker(), line.get_linestyle(),
                     line.get_linewidth())
            assert styles.setdefault(line.get_label(), style) == style, (
                f"{line.get_label()!r} drawn as {style} here and {styles[line.get_label()]} "
                f"in another panel")
    return styles


def assert_distinct_colour_and_marker(fig) -> None:
    styles = line_styles(fig)
    seen: dict[tuple[str, str], str] = {}
    for label, (colour, marker, _, _) in styles.items():
        other = seen.setdefault((colour, marker), label)
        assert other == label, f"{other!r} and {label!r} share colour {colour} and marker {marker}"


def _overlap(a, b) -> bool:
    """Two display boxes share an area (touching edges do not count)."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 0 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0


def assert_legends_outside_the_axes(fig) -> None:
    """Rendered with the figure's Agg canvas (the layout runs on draw): no legend's window
    extent overlaps any axes' extent or another legend, and each lies inside the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    legends += list(fig.legends)
    assert legends, "the figure has no legend"
    boxes = [legend.get_window_extent(renderer) for legend in legends]
    for i, box in enumerate(boxes):
        assert (box.x0 >= -1 and box.y0 >= -1 and box.x1 <= fig.bbox.x1 + 1
                and box.y1 <= fig.bbox.y1 + 1), f"legend {i} {box} leaves the figure {fig.bbox}"
        for k, ax in enumerate(fig.axes):
            extent = ax.get_window_extent(renderer)
            assert not _overlap(box, extent), f"legend {i} {box} overlaps axes {k} {extent}"
        for j, other in enumerate(boxes[:i]):
            assert not _overlap(box, other), f"legends {j} and {i} overlap"


def assert_reference_styles(fig, student: str, teacher: str) -> None:
    """In every panel the reference student is the black dashed line and the teacher the
    thick grey one, and no other series has their colour, the dash or the teacher's width."""
    for k, ax in enumerate(fig.axes):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert student in lines and teacher in lines, f"panel {k} lacks a reference row"
        s, t = lines.pop(student), lines.pop(teacher)
        assert to_hex(s.get_color()) == "#000000" and s.get_linestyle() == "--"
        assert t.get_linewidth() >= 3.0
        grey = to_hex(t.get_color())
        r, g, b = (int(grey[i:i + 2], 16) for i in (1, 3, 5))
        assert r == g == b and 0 < r < 255, f"teacher colour {grey} is not a grey"
        for label, line in lines.items():
            colour = to_hex(line.get_color())
            assert colour not in ("#000000", grey), f"{label!r} has a reference colour"
            assert line.get_linestyle() != "--", f"{label!r} is dashed like the student"
            assert line.get_linewidth() < t.get_linewidth(), f"{label!r} as thick as the teacher"
