"""Structured output on the server: a request's response_format / grammar / regex / choice turned
into the Guide its sequence decodes under (inference/constrain.py). Everything here runs on a
prompt-preparation thread: the first constrained request builds llguidance's view of the
262k-token vocabulary (~1 s), which must not stall the event loop or the engine."""

from __future__ import annotations

from ..inference.constrain import Constraint, Guide


class InvalidConstraint(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def constraint(body) -> tuple[Constraint, str] | None:
    """(the request's Constraint, the field it came from), or None when the output is free text."""
    fmt = body.response_format
    given = [name for name, value in (("response_format", fmt and fmt.type != "text"), ("grammar", body.grammar),
                                      ("regex", body.regex), ("choice", body.choice is not None)) if value]
    if not given:
        return None
    if len(given) > 1:
        raise InvalidConstraint(f"{' and '.join(given)} both constrain the output; send only one", given[1])
    try:
        if given[0] == "grammar":
            return Constraint("grammar", body.grammar), "grammar"
        if given[0] == "regex":
            return Constraint("regex", body.regex), "regex"
        if given[0] == "choice":
            return Constraint.choice(body.choice), "choice"
        if fmt.type == "json_object":
            return Constraint("json_object"), "response_format"
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InvalidConstraint("response_format type json_schema needs json_schema.schema",
                                    "response_format.json_schema")
        return Constraint.json_schema(fmt.json_schema.schema_), "response_format.json_schema.schema"
    except InvalidConstraint:
        raise
    except ValueError as e:
        raise InvalidConstraint(str(e), given[0]) from None


def guide(tokenizer, body, calling=None) -> Guide | None:
    """The request's Guide (its grammar checked against the tokenizer), or None. `calling`: the
    request's tools (inference/tools.Calling): the answer is constrained by Calling.constraint (a
    forced call to the calls' schema; "auto", a call to it once the answer opens one), and tools
    cannot be combined with another constraint on the answer."""
    found = constraint(body)
    if calling is not None and found is not None:
        field = found[1].split(".")[0]
        raise InvalidConstraint(f"{field} cannot be combined with tools the model may call; send tool_choice "
                                "'none' or no tools", field)
    if calling is not None:
        found = calling.constraint(), "tool_choice" if calling.forced else "tools"
    if found is None:
        return None
    spec, param = found
    if body.speculative is not None:  # drafted tokens are not masked: they would escape the grammar
        raise InvalidConstraint(f"{param.split('.')[0]} cannot be combined with speculative decoding; send one",
                                "speculative")
    try:
        return Guide(tokenizer, spec)
    except ValueError as e:
        raise InvalidConstraint(str(e), param) from None
