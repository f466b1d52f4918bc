"""JSON schemas of the kinds applications send, each with a request a small model can answer with it.

Shared by the engine, API and server tests of structured output: nested objects, arrays with bounds, enums,
numbers with bounds, optional fields, ``$ref``/``$defs``, ``anyOf``, patterns, constants, formats.
"""

from __future__ import annotations

from typing import Any

SCHEMAS: list[tuple[str, str, dict[str, Any]]] = [
    ("person", "Describe a person called Ada, aged 36.", {
        "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"]}),
    ("city", "Give the capital of France and its population in millions.", {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}, "population_millions": {"type": "number"}},
        "required": ["city", "population_millions"], "additionalProperties": False}),
    ("sentiment", "Is 'I love this phone' positive or negative?", {
        "type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}},
        "required": ["sentiment"]}),
    ("bounded", "Rate the movie Titanic from 1 to 10.", {
        "type": "object", "properties": {"rating": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["rating"]}),
    ("float-bounds", "What fraction of Earth is covered by water?", {
        "type": "object", "properties": {"fraction": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["fraction"]}),
    ("list", "List three fruits.", {
        "type": "object",
        "properties": {"fruits": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                  "minItems": 3, "maxItems": 3}},
        "required": ["fruits"]}),
    ("top-level-array", "Give two colours.", {
        "type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 2, "maxItems": 2}),
    ("nested", "Describe a book with its author.", {
        "type": "object", "properties": {
            "title": {"type": "string", "maxLength": 60},
            "author": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                         "born": {"type": "integer"}},
                       "required": ["name", "born"]}},
        "required": ["title", "author"]}),
    ("optional", "Describe a dog; its nickname is optional.", {
        "type": "object", "properties": {"breed": {"type": "string", "maxLength": 30},
                                         "nickname": {"type": "string", "maxLength": 20}},
        "required": ["breed"], "additionalProperties": False}),
    ("boolean", "Is water wet?", {
        "type": "object", "properties": {"answer": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 80}},
        "required": ["answer", "reason"]}),
    ("ref", "Give a line segment from (0, 0) to (3, 4).", {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"]}),
    ("anyof", "Give an ID: a number or a code string.", {
        "type": "object", "properties": {"id": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 12}]}},
        "required": ["id"]}),
    ("pattern", "Give a US ZIP code.", {
        "type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"]}),
    ("const", "Reply with version 2 of the API and a status.", {
        "type": "object", "properties": {"version": {"const": 2}, "status": {"enum": ["ok", "error"]}},
        "required": ["version", "status"]}),
    ("array-of-objects", "List two planets with their order from the Sun.", {
        "type": "object", "properties": {"planets": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                             "order": {"type": "integer", "minimum": 1, "maximum": 8}},
            "required": ["name", "order"], "additionalProperties": False}}},
        "required": ["planets"]}),
    ("nullable", "Give a person's middle name, or null if they have none: John Smith.", {
        "type": "object", "properties": {"middle_name": {"type": ["string", "null"], "maxLength": 20}},
        "required": ["middle_name"]}),
    ("date", "When did the Berlin Wall fall? Give the date.", {
        "type": "object", "properties": {"date": {"type": "string", "format": "date"}}, "required": ["date"]}),
    ("enum-list", "Which of these are primary colours: red, green, blue, yellow?", {
        "type": "object", "properties": {"primary": {"type": "array", "minItems": 1, "maxItems": 4,
                                                     "items": {"enum": ["red", "green", "blue", "yellow"]}}},
        "required": ["primary"]}),
    ("deep", "Describe a company with its address.", {
        "type": "object", "properties": {"company": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 40},
            "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                          "country": {"type": "string", "maxLength": 30}},
                        "required": ["city", "country"]}},
            "required": ["name", "address"]}},
        "required": ["company"]}),
    ("string-bounds", "Summarize 'the cat sat on the mat' in a few words.", {
        "type": "object", "properties": {"summary": {"type": "string", "minLength": 3, "maxLength": 40}},
        "required": ["summary"]}),
    ("integer-list", "Give the first four prime numbers.", {
        "type": "object", "properties": {"primes": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                                    "minItems": 4, "maxItems": 4}},
        "required": ["primes"]}),
    ("mixed", "Give a product with a name, price and whether it is in stock.", {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                         "price": {"type": "number", "exclusiveMinimum": 0},
                                         "in_stock": {"type": "boolean"},
                                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                  "maxItems": 3}},
        "required": ["name", "price", "in_stock"]}),
]
