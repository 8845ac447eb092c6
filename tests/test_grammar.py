"""Structured output in the Python API (purelm.grammar through LLM.generate, generate_batch and chat):
every reply stays inside its JSON schema or GBNF grammar and ends where the grammar does."""
import json

import pytest

import purelm
from purelm.errors import UsageError

pytest.importorskip("llguidance")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return purelm.load(smollm2_path, n_ctx=512)


def _person(text: str) -> dict:
    obj = json.loads(text)
    assert set(obj) == {"name", "age"} and isinstance(obj["name"], str) and len(obj["name"]) <= 20, obj
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool) and 0 <= obj["age"] <= 150, obj
    return obj


def test_json_schema_and_gbnf_keep_every_reply_inside(llm):
    # unconstrained, this prompt does not give JSON: the constraint is what makes it
    free = llm.generate("Describe a person:", max_tokens=40, temperature=0)
    with pytest.raises(ValueError):
        json.loads(free)
    done = llm.complete("Describe a person:", json_schema=PERSON, max_tokens=80, temperature=0)
    assert done.finish_reason == "stop"  # the grammar's end ends the reply
    _person(done.text)
    assert "".join(llm.stream("Describe a person:", json_schema=PERSON, max_tokens=80, temperature=0)) == done.text
    for seed in range(3):  # sampled, too
        _person(llm.generate("Describe a person:", json_schema=PERSON, max_tokens=80, temperature=1.0, seed=seed))
    assert llm.generate("Is the sky blue? Answer:", grammar='root ::= "yes" | "no"', max_tokens=10) in ("yes", "no")
    # ignore_eos would run past the grammar's end: the grammar ends the reply all the same
    assert llm.generate("x", grammar='root ::= "a" "b"', ignore_eos=True, max_tokens=10) == "ab"


def test_each_sample_of_a_batch_has_its_own_place_in_the_grammar(llm):
    out = llm.generate_batch(["Describe a person:", "A person as JSON:"], n=2, json_schema=PERSON, max_tokens=80,
                             temperature=1.0, seed=7)
    people = [_person(c.text) for c in out]
    assert len(people) == 4 and all(c.finish_reason == "stop" for c in out)
    assert people[0] != people[1] or people[2] != people[3]  # seeds 7 and 8: the samples differ


def test_chat_with_a_schema_or_a_forced_tool_call(llm):
    msgs = [{"role": "user", "content": "Hello! How are you?"}]
    c = llm.chat(msgs, json_schema=PERSON, max_tokens=80, temperature=0)
    _person(c.content)
    free = llm.chat(msgs, tools=[TIME], max_tokens=40, temperature=0)
    assert free.finish_reason != "tool_calls"  # left free, this model answers in words
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        c = llm.chat(msgs, tools=[TIME], tool_choice=choice, max_tokens=40, temperature=0)
        assert c.finish_reason == "tool_calls" and [t["function"]["name"] for t in c.tool_calls] == ["get_time"]
        assert json.loads(c.tool_calls[0]["function"]["arguments"])["tz"] in ("UTC", "CET")
    none = llm.chat(msgs, tools=[TIME], tool_choice="none", max_tokens=8, temperature=0)
    assert none.prompt_tokens == llm.chat(msgs, max_tokens=8, temperature=0).prompt_tokens  # tools left out
    call = '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>'
    none = llm.chat(msgs, tools=[TIME], tool_choice="none", grammar=f"root ::= {json.dumps(call)}", max_tokens=40)
    assert none.content == call and not none.tool_calls  # "none": the reply is not read for calls
    # parameters as pydantic writes them ($defs and $ref): each tool's schema is the root of its own rule
    zone = {"type": "function", "function": {"name": "set_zone", "parameters": {
        "type": "object", "properties": {"zone": {"$ref": "#/$defs/Zone"}}, "required": ["zone"],
        "additionalProperties": False, "$defs": {"Zone": {"type": "string", "enum": ["UTC", "CET"]}}}}}
    c = llm.chat(msgs, tools=[TIME, zone], tool_choice={"type": "function", "function": {"name": "set_zone"}},
                 max_tokens=40, temperature=0)
    assert c.finish_reason == "tool_calls" and json.loads(c.tool_calls[0]["function"]["arguments"]) in (
        {"zone": "UTC"}, {"zone": "CET"})


def test_required_allows_several_calls_unless_parallel_tool_calls_is_false(llm):
    """With the end of the turn all but banned (a bias of -100), "required" goes on with a second call;
    with parallel_tool_calls=False the grammar ends after one, and the reply with it."""
    msgs = [{"role": "user", "content": "Hello! How are you?"}]
    ban = {t: -100.0 for t in {*llm.tokenizer.eog_ids, *llm.chat_template.stop_token_ids}}
    several = llm.chat(msgs, tools=[TIME], tool_choice="required", max_tokens=70, temperature=0, logit_bias=ban)
    assert len(several.tool_calls) >= 2 and several.text.count("<tool_call>") >= 2
    one = llm.chat(msgs, tools=[TIME], tool_choice="required", max_tokens=70, temperature=0, logit_bias=ban,
                   parallel_tool_calls=False)
    assert one.finish_reason == "tool_calls" and len(one.tool_calls) == 1
    with pytest.raises(UsageError, match="parallel_tool_calls must be True or False"):
        llm.chat(msgs, tools=[TIME], parallel_tool_calls="no", max_tokens=4)


def test_a_grammar_does_not_keep_its_model_alive(smollm2_path):
    import gc
    import weakref

    llm = purelm.load(smollm2_path, n_ctx=64)
    assert llm.generate("x", grammar='root ::= "a"', max_tokens=4) == "a"
    tokenizer = weakref.ref(llm.tokenizer)
    del llm
    gc.collect()
    assert tokenizer() is None  # the vocabulary llguidance keeps for it goes with it


@pytest.mark.parametrize("kwargs, message", [
    ({"json_schema": {"type": "nonsense"}}, "JSON schema is invalid"),
    ({"json_schema": [1]}, "must be a dict"),
    ({"grammar": "root ::= missing"}, "grammar is invalid: Rule 'missing' not found"),
    ({"grammar": 5}, "must be a str"),
    ({"grammar": 'root ::= "a"', "json_schema": {}}, "one of grammar and json_schema"),
    ({"grammar": 'root ::= "a"', "lookup": 3}, "speculative decoding"),
])
def test_bad_grammars_are_refused_before_any_work(llm, kwargs, message):
    with pytest.raises(UsageError, match=message):
        llm.generate("x", max_tokens=4, **kwargs)


def test_bad_tool_choice_is_refused(llm):
    msgs = [{"role": "user", "content": "hi"}]
    odd = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "enum": {1, 2}}}}
    for tools, choice, message in [(None, "required", "give tools"), ([TIME], "always", "tool_choice must be"),
                                   ([TIME], {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
                                   ([TIME], {"type": "function", "function": "get_time"}, "a function's name"),
                                   ([TIME], {"function": None}, "a function's name"),
                                   ([odd], "required", "f"),
                                   ([{"type": "function", "function": {"name": "f g"}}], "required", "letters")]:
        with pytest.raises(UsageError, match=message):
            llm.chat(msgs, tools=tools, tool_choice=choice, max_tokens=4)
