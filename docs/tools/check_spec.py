#!/usr/bin/env python3
"""Check docs/openapi.yaml against the collapsed seed spec it was expanded from.

Usage: python3 docs/tools/check_spec.py [SEED_TXT] [OPENAPI_YAML]
       (defaults: docs/spec/seed-openapi.txt, docs/openapi.yaml)

Checks (all must pass, exit status 1 otherwise):
  1. openapi-spec-validator accepts the document (OpenAPI 3.1).
  2. Round trip: the YAML text, with line breaks/indentation collapsed back to
     single spaces, is word-for-word the seed text (the only allowed difference
     is a block-scalar indicator `|` written as `>`).
  3. Every operationId of the seed appears exactly once, and no other.
  4. Every path key of the seed appears, in order, and no other.
  5. Every $ref target appears the same number of times as in the seed, and
     every local $ref resolves.
  6. Per operation, the multiset of response codes equals the seed's.
  7. The component schema / response / securityScheme names equal the seed's.
  8. Every `required: [...]` list of the seed is present, in document order,
     on a schema, and every required name is a property of that schema.
  9. Schema sanity: keywords sit on a schema whose `type` fits (format, enum,
     default, minimum/maximum, min/maxLength, items, properties, nullable ...).
"""
import collections
import os
import re
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
# The seed spec as it was given (one line: every newline and indentation run collapsed to a
# single space), kept byte for byte.
DEFAULT_SEED = os.path.normpath(os.path.join(HERE, '..', 'spec', 'seed-openapi.txt'))
DEFAULT_YAML = os.path.normpath(os.path.join(HERE, '..', 'openapi.yaml'))
METHODS = ('get', 'put', 'post', 'delete', 'patch', 'options', 'head', 'trace')

errors = []


def err(msg):
    errors.append(msg)


def walk(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, path + (i,))


def check_validator(path):
    try:
        from openapi_spec_validator import validate
        from openapi_spec_validator.readers import read_from_filename
    except ImportError:
        err('openapi-spec-validator not installed (pip install openapi-spec-validator)')
        return
    spec, _ = read_from_filename(path)
    try:
        validate(spec)
    except Exception as e:  # noqa: BLE001
        err(f'openapi-spec-validator: {e}')


EXT_BEGIN = '# >>> wrenn extension'
EXT_END = '# <<< wrenn extension'


def strip_extensions(text):
    """Drop the blocks Wrenn adds to the seed (between EXT_BEGIN and EXT_END comment lines)."""
    out, inside = [], False
    for ln in text.splitlines():
        if ln.strip().startswith(EXT_BEGIN):
            inside = True
        elif ln.strip().startswith(EXT_END):
            inside = False
        elif not inside:
            out.append(ln)
    if inside:
        err('unterminated wrenn extension block')
    return '\n'.join(out)


def check_roundtrip(seed, text):
    text = strip_extensions(text)
    out_words = ' '.join(ln.strip() for ln in text.splitlines() if ln.strip()).split(' ')
    seed_words = seed.split(' ')
    if len(out_words) != len(seed_words):
        err(f'round trip: {len(out_words)} words in YAML vs {len(seed_words)} in seed')
    for k, (a, b) in enumerate(zip(seed_words, out_words)):
        if a == b:
            continue
        if a in ('|', '>') and b == '>' and k > 0 and seed_words[k - 1].endswith(':'):
            continue
        err(f'round trip: word {k}: seed {a!r} vs yaml {b!r} near '
            f'{" ".join(seed_words[max(0, k - 8):k + 8])!r}')
        break


def seed_operations(seed):
    """Split the seed at each operationId; count response codes per segment."""
    body = seed.split(' components: responses: ')[0]
    parts = re.split(r' operationId: (\S+) ', body)
    ops = {}
    for k in range(1, len(parts), 2):
        op, seg = parts[k], parts[k + 1]
        ops[op] = collections.Counter(re.findall(r'(?:^| )"(\d{3})": ', seg))
    return ops


def main(argv):
    seed_path = argv[1] if len(argv) > 1 else DEFAULT_SEED
    yaml_path = argv[2] if len(argv) > 2 else DEFAULT_YAML
    seed = open(seed_path, encoding='utf-8').read().strip()
    text = open(yaml_path, encoding='utf-8').read()
    doc = yaml.safe_load(text)

    # 1
    check_validator(yaml_path)
    # 2
    check_roundtrip(seed, text)

    # 3 operationIds
    seed_ops = re.findall(r'(?:^| )operationId: (\S+)', seed)
    out_ops = []
    op_objs = {}
    for p, item in doc['paths'].items():
        for m in METHODS:
            if m in item:
                out_ops.append(item[m]['operationId'])
                op_objs[item[m]['operationId']] = (p, m, item[m])
    if collections.Counter(seed_ops) != collections.Counter(out_ops):
        err(f'operationIds differ: {set(seed_ops) ^ set(out_ops)}')
    dup = [o for o, c in collections.Counter(out_ops).items() if c > 1]
    if dup:
        err(f'duplicate operationIds: {dup}')

    # 4 paths
    seed_paths = [w[:-1] for w in seed.split(' ') if re.match(r'^/\S*:$', w)]
    if seed_paths != list(doc['paths']):
        err(f'paths differ: {set(seed_paths) ^ set(doc["paths"])}')

    # 5 $refs
    seed_refs = collections.Counter(re.findall(r'\$ref: "([^"]+)"', seed))
    out_refs = collections.Counter(v['$ref'] for _, v in walk(doc)
                                   if isinstance(v, dict) and '$ref' in v)
    if seed_refs != out_refs:
        err(f'$ref counts differ: seed-yaml={seed_refs - out_refs} yaml-seed={out_refs - seed_refs}')
    for ref in out_refs:
        node = doc
        for part in ref.lstrip('#/').split('/'):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            err(f'unresolved $ref {ref}')

    # 6 response codes per operation
    for op, codes in seed_operations(seed).items():
        if op not in op_objs:
            continue
        got = collections.Counter(str(c) for c in op_objs[op][2].get('responses', {}))
        if got != codes:
            err(f'{op}: response codes {sorted(got)} vs seed {sorted(codes)}')

    # 7 component names
    comp = seed.split(' components: ', 1)[1]
    resp_part, rest = comp.split(' securitySchemes: ', 1)
    sec_part, schema_part = rest.split(' schemas: ', 1)
    seed_resps = re.findall(r'(?:^| )([A-Z]\w*): description: ', resp_part)
    seed_secs = re.findall(r'(?:^| )([a-z]\w*): type: ', sec_part)
    seed_schemas = re.findall(r'(?:^| )([A-Z]\w*): (?:type|allOf|\$ref|oneOf|anyOf):? ', schema_part)
    for kind, seed_names in (('responses', seed_resps), ('securitySchemes', seed_secs),
                             ('schemas', seed_schemas)):
        got = list(doc['components'].get(kind, {}))
        if got != seed_names:
            err(f'components/{kind} differ: {set(got) ^ set(seed_names)}')

    # 8 required lists
    seed_req = [yaml.safe_load(m) for m in re.findall(r' required: (\[[^\]]*\])', seed)]
    out_req = []
    for path, v in walk(doc):
        if isinstance(v, dict) and isinstance(v.get('required'), list):
            out_req.append(v['required'])
            props = v.get('properties', {})
            for name in v['required']:
                if name not in props:
                    err(f'{"/".join(map(str, path))}: required {name!r} is not a property')
    if seed_req != out_req:
        err(f'required lists differ: seed {seed_req} vs yaml {out_req}')

    # 9 schema sanity
    check_schemas(doc)

    # 10 folded block scalars: every string is one paragraph (no inner newline,
    #    no doubled spaces), i.e. exactly the collapsed seed text
    for path, v in walk(doc):
        if isinstance(v, str) and ('\n' in v.rstrip('\n') or '  ' in v):
            err(f'{"/".join(map(str, path))}: string is not a single paragraph')

    # 11 the disambiguation decisions of reexpand_spec.py (R1-R4) hold
    check_decisions(doc)

    n_ops = len(out_ops)
    print(f'paths={len(doc["paths"])} operations={n_ops} '
          f'schemas={len(doc["components"]["schemas"])} '
          f'component responses={len(doc["components"]["responses"])} '
          f'securitySchemes={len(doc["components"]["securitySchemes"])} '
          f'$refs={sum(out_refs.values())}')
    if errors:
        for e in errors:
            print('FAIL:', e)
        return 1
    print('OK: all checks passed')
    return 0


SCHEMA_KEYS = {'type', 'format', 'description', 'properties', 'required', 'items', 'enum',
               'default', 'example', 'nullable', 'minimum', 'maximum', 'minLength',
               'maxLength', 'additionalProperties', 'allOf', 'oneOf', 'anyOf', '$ref', 'title'}
FORMATS = {'string': {'date', 'date-time', 'email', 'uri', 'binary', 'uuid', 'byte', 'password'},
           'integer': {'int32', 'int64'}, 'number': {'float', 'double'}}
PYTYPES = {'string': str, 'integer': int, 'number': (int, float), 'boolean': bool,
           'object': dict, 'array': list}


def schema_nodes(doc):
    """Yield (path, schema) for every schema object in the document."""
    def rec(s, path):
        if not isinstance(s, dict):
            return
        yield path, s
        for k, sub in (s.get('properties') or {}).items():
            yield from rec(sub, path + '/properties/' + k)
        if isinstance(s.get('items'), dict):
            yield from rec(s['items'], path + '/items')
        if isinstance(s.get('additionalProperties'), dict):
            yield from rec(s['additionalProperties'], path + '/additionalProperties')
        for comb in ('allOf', 'oneOf', 'anyOf'):
            for i, sub in enumerate(s.get(comb) or []):
                yield from rec(sub, f'{path}/{comb}/{i}')

    for name, s in doc['components']['schemas'].items():
        yield from rec(s, 'components/schemas/' + name)
    for path, v in walk(doc):
        if path and path[0] == 'components' and len(path) > 1 and path[1] == 'schemas':
            continue
        if path and path[-1] == 'schema' and isinstance(v, dict):
            yield from rec(v, '/'.join(map(str, path)))


def check_schemas(doc):
    for path, s in schema_nodes(doc):
        extra = {k for k in set(s) - SCHEMA_KEYS if not k.startswith('x-')}
        if extra:
            err(f'{path}: unexpected schema keys {sorted(extra)}')
        if '$ref' in s and len(s) > 1:
            err(f'{path}: $ref with siblings {sorted(s)}')
        t = s.get('type')
        types = t if isinstance(t, list) else [t] if t else []
        for tt in types:
            if tt not in PYTYPES and tt != 'null':
                err(f'{path}: bad type {tt!r}')
        if 'format' in s and not any(s['format'] in FORMATS.get(tt, ()) for tt in types):
            err(f'{path}: format {s["format"]!r} on type {t!r}')
        if 'items' in s and 'array' not in types:
            err(f'{path}: items on type {t!r}')
        if ('properties' in s or 'additionalProperties' in s) and types and 'object' not in types:
            err(f'{path}: properties on type {t!r}')
        if any(k in s for k in ('minLength', 'maxLength')) and 'string' not in types:
            err(f'{path}: minLength/maxLength on type {t!r}')
        if any(k in s for k in ('minimum', 'maximum')) and not {'integer', 'number'} & set(types):
            err(f'{path}: minimum/maximum on type {t!r}')
        if 'nullable' in s and not types and 'allOf' not in s:
            err(f'{path}: nullable without type')
        for k in ('default', 'example'):
            if k in s and types and not any(isinstance(s[k], PYTYPES.get(tt, ())) for tt in types):
                # YAML may read plain `1h` etc. as str; only flag clear mismatches
                err(f'{path}: {k} {s[k]!r} does not fit type {t!r}')
        if 'enum' in s:
            if not isinstance(s['enum'], list):
                err(f'{path}: enum is not a list')
            elif types and not all(any(isinstance(x, PYTYPES.get(tt, ())) for tt in types)
                                   for x in s['enum']):
                err(f'{path}: enum values {s["enum"]} do not fit type {t!r}')
            if 'default' in s and s['default'] not in s['enum']:
                err(f'{path}: default {s["default"]!r} not in enum')
        if types == ['object'] and not any(k in s for k in ('properties', 'additionalProperties')):
            pass  # free-form objects are allowed ({type: object})


def check_decisions(doc):
    sch = doc['components']['schemas']
    expect = {
        'CapsuleStats': ['range', 'current', 'peaks', 'series'],
        'SSEEvent': ['event', 'outcome', 'resource', 'actor', 'metadata', 'error',
                     'sandbox', 'timestamp'],
    }
    for name, props in expect.items():
        if list(sch[name]['properties']) != props:
            err(f'R4: {name} properties {list(sch[name]["properties"])} != {props}')
    if list(sch['HostHasCapsulesError']['properties']['error']['properties']) != \
            ['code', 'message', 'sandbox_ids']:
        err('HostHasCapsulesError.error properties changed')
    sandbox = sch['SSEEvent']['properties']['sandbox']
    if not (sandbox.get('nullable') is True and 'description' in sandbox):
        err('R1: SSEEvent.sandbox lost nullable/description')
    for path, s in schema_nodes(doc):
        if path.endswith(('/items', '/additionalProperties')) and \
                ('description' in s or 'nullable' in s):
            err(f'R2: {path} has description/nullable')
    for path, v in walk(doc):
        if path and path[-1] == 'parameters' and isinstance(v, list):
            for prm in v:
                if isinstance(prm.get('schema'), dict) and 'description' in prm['schema']:
                    err(f'R3: {"/".join(map(str, path))}/{prm["name"]}: description in schema')


if __name__ == '__main__':
    sys.exit(main(sys.argv))
