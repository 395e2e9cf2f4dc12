"""Zero- and few-shot prompts: the query is the finetuning prompt (or GPT-2's TL;DR format for
CNN/DM zero-shot), training examples go before it only as far as the block allows."""
import pytest

import fewshot
import tasks
from common import get_tokenizer


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer()


def test_demonstrations_that_do_not_fit_are_skipped_and_the_input_span_moves():
    prompt = tasks.Prompt(ids=[7, 8, 9], cut=0, input_span=(1, 2))
    demos = [[1] * 4, [2] * 10, [3] * 3, [4] * 2]
    shot, used = fewshot.with_demonstrations(prompt, demos, shots=2, room=8)
    assert used == 2 and shot.ids == [1] * 4 + [3] * 3 + [7, 8, 9]  # the 10-token one did not fit
    assert shot.ids[slice(*shot.input_span)] == [8]
    assert fewshot.with_demonstrations(prompt, demos, shots=3, room=1) == (prompt, 0)


@pytest.mark.parametrize("name,block_size", [("squad", 512), ("sst2", 256), ("cnn_dailymail", 1024)])
def test_few_shot_prompts_end_with_the_uncut_finetuning_prompt_and_fit_the_block(enc, shared_data, name, block_size):
    task = tasks.get_task(name)
    rows = task.load_rows(task.eval_splits[0], str(shared_data), limit=6)
    prompts, used, record = fewshot.build_prompts(task, rows, enc, block_size, 3, str(shared_data))
    for row, prompt, n in zip(rows, prompts, used):
        alone = task.prompt(row, enc, block_size).ids
        assert prompt.ids[len(prompt.ids) - len(alone):] == alone
        assert len(prompt.ids) + task.max_target_tokens <= block_size
        assert (n > 0) == (len(prompt.ids) > len(alone)) and 0 <= n <= 3
        assert enc.decode(prompt.ids).count(task.separator) == n + 1  # n solved examples, then the query
    assert record["requested"] == 3 and record["used_min"] <= record["used_mean"] <= record["used_max"]
    if name == "sst2":  # short sentences: all three fit, and the labels are not all the same
        assert used == [3] * 6
        text = enc.decode(prompts[0].ids)
        assert "Sentiment: positive\n\n" in text and "Sentiment: negative\n\n" in text


def test_zero_shot_summaries_use_gpt2s_tldr_format_and_other_tasks_their_prompt(enc, shared_data):
    cnn = tasks.get_task("cnn_dailymail")
    row = cnn.load_rows("test", str(shared_data), limit=1)[0]
    [prompt], [used], record = fewshot.build_prompts(cnn, [row], enc, 512, 0)
    text = enc.decode(prompt.ids)
    assert text.endswith("\nTL;DR:") and text.startswith(row["article"][:40]) and cnn.instruction not in text
    assert used == 0 and "TL;DR" in record["format"]
    squad = tasks.get_task("squad")
    row = squad.load_rows("validation", str(shared_data), limit=1)[0]
    assert fewshot.build_prompts(squad, [row], enc, 512, 0)[0] == [squad.prompt(row, enc, 512)]
    assert fewshot.build_prompts(squad, [row], enc, 512)[1:] == ([None], {"requested": None,
                                                                         "format": "finetuning prompt"})
