from dashboard.agents.alignment import align


def lines(*names: str) -> list[str]:
    return [f'{{"type":"assistant","n":"{name}"}}' for name in names]


def test_it_keeps_everything_on_a_first_connect():
    result = align([], lines("a", "b"))
    assert result.new_lines == lines("a", "b")
    assert not result.gap


def test_it_drops_what_is_already_stored():
    result = align(lines("a", "b", "c"), lines("a", "b", "c", "d", "e"))
    assert result.new_lines == lines("d", "e")
    assert not result.gap


def test_it_finds_the_overlap_when_the_ring_starts_later_than_what_is_stored():
    result = align(lines("a", "b", "c", "d"), lines("c", "d", "e"), truncated=True)
    assert result.new_lines == lines("e")
    assert not result.gap


def test_it_returns_nothing_new_when_the_replay_is_all_stored():
    assert align(lines("a", "b"), lines("a", "b")).new_lines == []


def test_it_handles_repeated_identical_lines():
    same = lines("x")[0]
    result = align([same, same], [same, same, same])
    assert result.new_lines == [same]


def test_it_skips_a_line_whose_head_the_ring_evicted():
    replay = ['tail of a line"}', *lines("b", "c")]
    result = align(lines("a", "b"), replay, truncated=True)
    assert result.new_lines == lines("c")
    assert result.dropped_partial


def test_it_reports_a_gap_when_nothing_stored_is_left_in_the_ring():
    replay = ['t"}', *lines("x", "y")]
    result = align(lines("a", "b"), replay, truncated=True)
    assert result.gap
    assert result.new_lines == lines("x", "y")


def test_it_reports_a_gap_on_a_first_connect_to_a_truncated_ring():
    result = align([], ['cut"}', *lines("x")], truncated=True)
    assert result.gap
    assert result.new_lines == lines("x")


def test_it_keeps_a_whole_first_line_of_a_truncated_ring():
    result = align([], lines("x", "y"), truncated=True)
    assert result.gap
    assert result.new_lines == lines("x", "y")
