#!/usr/bin/env python3
"""Re-expand the seed OpenAPI spec whose line breaks were lost.

Input : docs/spec/seed-openapi.txt  (one line; every newline and
        indentation run collapsed to a single space)
Output: docs/openapi.yaml

Usage:  python3 docs/tools/reexpand_spec.py [INPUT] [OUTPUT]

How it works
------------
The collapsed text is split on single spaces into words.  A recursive-descent
parser that knows the shape of an OpenAPI 3.1 document (which keys each object
type has, which keys are user-named map keys, which values are scalars, flow
collections, block sequences ...) rebuilds the tree:

* A "key" is a word ending in ':' that looks like a YAML key.  It is taken as a
  key only if some open object on the parser stack accepts it:
    - fixed keys: the key belongs to that object type and is not yet present;
    - user-named keys (paths, properties, schemas, responses, media types, ...)
      must match the naming pattern of that map (paths start with '/',
      component names are CamelCase, property names are snake_case, response
      codes are quoted 3-digit numbers, ...);
  and in both cases a one-token look-ahead must fit the value's type (e.g. a
  property name must be followed by a schema keyword or a `{...}` flow map of
  schema keywords; a security requirement by `[`; `type:` by a scalar ...).
* A '-' word starts a block-sequence item only if an open sequence accepts an
  item starting with the next word.
* Plain and block scalars (descriptions, summaries, ...) run until the first
  word that is accepted as a key / list item by any open object.
* Quoted scalars and flow collections (`[a, b]`, `{type: string}`) are read as
  balanced units and kept verbatim.
* When several open objects accept a key, the innermost wins, except for the
  disambiguation rules below.

Disambiguation rules (all ambiguities of the collapsed text, decided here)
--------------------------------------------------------------------------
R1  An object holding `$ref` is closed: keys after a `$ref` belong to an outer
    object (e.g. `allOf: [- $ref: X]` then `nullable: true` -> outer schema).
R2  A schema that is the value of `items` or `additionalProperties` does not
    take `description` / `nullable`; they go to the enclosing property schema
    (e.g. `providers: {type: array, items: {type: string}, description: ...}`).
R3  The inline `schema` of a Parameter does not take `description`; it goes to
    the Parameter (the document's convention: `/v1/admin/.../{selector}` has
    `schema: {type: string}` followed by `description:`, which can only be the
    parameter's).  `example` inside a parameter's schema stays in the schema.
R4  Hand fixes for inline nested objects whose closing point is invisible in
    the collapsed text (see FORCE_PARENT): in CapsuleStats, `peaks` and
    `series` are siblings of `current` (not nested in it); in SSEEvent,
    `actor`, `metadata`, `error`, `sandbox`, `timestamp` are top-level
    properties (siblings of `resource`), as the example frame in
    GET /v1/events/stream shows (`resource`, `sandbox`, `timestamp` siblings).
    All other nested `properties` keep the innermost attachment
    (e.g. HostHasCapsulesError.error.properties.sandbox_ids).

Output style
------------
2-space indentation; scalars are written verbatim as they appear in the input
(quotes and flow collections kept).  Block scalars (`|` and `>`) are written as
folded block scalars (`>`) wrapped at ~100 columns: their value is exactly the
collapsed single-paragraph text (the original line breaks are unknowable).
Plain multi-word scalars are kept on one line.
"""
import os
import re
import sys
import textwrap

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_IN = os.path.normpath(os.path.join(HERE, '..', 'spec', 'seed-openapi.txt'))
DEFAULT_OUT = os.path.normpath(os.path.join(HERE, '..', 'openapi.yaml'))

# ---------------------------------------------------------------- types ----


class Seq:
    def __init__(self, item, flow_ok=True):
        self.item = item
        self.flow_ok = flow_ok


class Obj:
    def __init__(self, name, fixed=None, patterns=None, flow_ok=False):
        self.name = name
        self.fixed = fixed or {}
        self.patterns = patterns or []   # list of (compiled regex, value type)
        self.flow_ok = flow_ok

    def value_type(self, key):
        if key in self.fixed:
            return self.fixed[key]
        for rx, vt in self.patterns:
            if rx.match(key):
                return vt
        return None


# scalar value kinds
TEXT = 'text'        # plain (possibly multi-word), quoted, or block scalar
WORD = 'word'        # one plain word or one quoted string
BOOL = 'bool'
NUM = 'num'
FLOWSEQ = 'flowseq'  # [ ... ]
ANY = 'any'          # default/example: plain multi-word, quoted or flow
TYPEVAL = 'typeval'  # schema `type`: word or [a, b]
ENUM = 'enum'        # flow seq or block seq of words
SCHEMA_OR_BOOL = 'schema_or_bool'

ident = r'[A-Za-z_][A-Za-z0-9_]*'
RX_PATH = re.compile(r'^/\S*$')
RX_CAMEL = re.compile(r'^[A-Z][A-Za-z0-9]*$')
RX_LOWER_CAMEL = re.compile(r'^[a-z][A-Za-z0-9]*$')
RX_PROP = re.compile(r'^[a-z_][a-z0-9_]*$')
RX_STATUS = re.compile(r'^"([1-5][0-9][0-9]|[1-5]XX)"$')
RX_MEDIA = re.compile(r'^[a-z]+/[A-Za-z0-9.+*-]+$')

SCHEMA = Obj('Schema', flow_ok=True)
SCHEMA.fixed.update({
    '$ref': WORD, 'type': TYPEVAL, 'format': WORD, 'title': TEXT,
    'description': TEXT, 'properties': None, 'required': Seq(WORD),
    'items': SCHEMA, 'enum': ENUM, 'default': ANY, 'example': ANY,
    'examples': ANY, 'const': ANY,
    'nullable': BOOL, 'readOnly': BOOL, 'writeOnly': BOOL, 'deprecated': BOOL,
    'minimum': NUM, 'maximum': NUM, 'exclusiveMinimum': NUM,
    'exclusiveMaximum': NUM, 'minLength': NUM, 'maxLength': NUM,
    'minItems': NUM, 'maxItems': NUM, 'uniqueItems': BOOL, 'pattern': WORD,
    'additionalProperties': SCHEMA_OR_BOOL,
    'allOf': Seq(SCHEMA), 'oneOf': Seq(SCHEMA), 'anyOf': Seq(SCHEMA),
    'not': SCHEMA,
})
PROPERTIES = Obj('Properties', patterns=[(RX_PROP, SCHEMA)])
SCHEMA.fixed['properties'] = PROPERTIES

SECREQ = Obj('SecurityRequirement', patterns=[(RX_LOWER_CAMEL, FLOWSEQ)])
MEDIATYPE = Obj('MediaType', {'schema': SCHEMA, 'example': ANY, 'examples': ANY})
CONTENT = Obj('Content', patterns=[(RX_MEDIA, MEDIATYPE)])
HEADER = Obj('Header', {'description': TEXT, 'schema': SCHEMA, 'required': BOOL})
RESPONSE = Obj('Response', {'$ref': WORD, 'description': TEXT, 'content': CONTENT,
                            'headers': Obj('Headers', patterns=[(re.compile(r'^[A-Za-z0-9-]+$'), HEADER)])})
RESPONSES = Obj('Responses', patterns=[(RX_STATUS, RESPONSE)])
PARAMETER = Obj('Parameter', {
    '$ref': WORD, 'name': WORD, 'in': WORD, 'required': BOOL, 'description': TEXT,
    'schema': SCHEMA, 'example': ANY, 'deprecated': BOOL, 'style': WORD,
    'explode': BOOL, 'allowEmptyValue': BOOL})
REQUESTBODY = Obj('RequestBody', {'$ref': WORD, 'required': BOOL, 'description': TEXT,
                                  'content': CONTENT})
OPERATION = Obj('Operation', {
    'summary': TEXT, 'description': TEXT, 'operationId': WORD, 'tags': Seq(WORD),
    'parameters': Seq(PARAMETER), 'requestBody': REQUESTBODY,
    'responses': RESPONSES, 'security': Seq(SECREQ), 'deprecated': BOOL})
PATHITEM = Obj('PathItem', {
    'summary': TEXT, 'description': TEXT, 'parameters': Seq(PARAMETER),
    **{m: OPERATION for m in ('get', 'put', 'post', 'delete', 'patch',
                              'options', 'head', 'trace')}})
PATHS = Obj('Paths', patterns=[(RX_PATH, PATHITEM)])
SECSCHEME = Obj('SecurityScheme', {
    'type': WORD, 'in': WORD, 'name': WORD, 'description': TEXT,
    'scheme': WORD, 'bearerFormat': WORD})
COMPONENTS = Obj('Components', {
    'schemas': Obj('Schemas', patterns=[(RX_CAMEL, SCHEMA)]),
    'responses': Obj('ComponentResponses', patterns=[(RX_CAMEL, RESPONSE)]),
    'parameters': Obj('ComponentParameters', patterns=[(RX_CAMEL, PARAMETER)]),
    'requestBodies': Obj('ComponentRequestBodies', patterns=[(RX_CAMEL, REQUESTBODY)]),
    'securitySchemes': Obj('SecuritySchemes', patterns=[(RX_LOWER_CAMEL, SECSCHEME)]),
})
INFO = Obj('Info', {'title': TEXT, 'description': TEXT, 'version': WORD,
                    'termsOfService': WORD})
SERVER = Obj('Server', {'url': WORD, 'description': TEXT})
TAG = Obj('Tag', {'name': WORD, 'description': TEXT})
ROOT = Obj('Root', {
    'openapi': WORD, 'info': INFO, 'servers': Seq(SERVER), 'security': Seq(SECREQ),
    'paths': PATHS, 'components': COMPONENTS, 'tags': Seq(TAG),
    'jsonSchemaDialect': WORD})

SCHEMA_KEYS = set(SCHEMA.fixed)

# R4: hand fixes.  For an inline object schema at path P (a key of this dict),
# the listed property names always attach to P's own `properties` map, never
# to a `properties` map nested deeper inside P.
FORCE_PARENT = {
    'components/schemas/CapsuleStats': {'peaks', 'series'},
    'components/schemas/SSEEvent': {'actor', 'metadata', 'error', 'sandbox', 'timestamp'},
}

RX_KEYFORM = re.compile(r'^(?:"[^"]*"|[A-Za-z_$/][A-Za-z0-9_$/{}.+*\-]*):$')
RX_NUM = re.compile(r'^-?[0-9]+(\.[0-9]+)?$')
BLOCK_INDICATORS = {'|', '>', '|-', '>-', '|+', '>+'}


def is_keyform(w):
    return bool(RX_KEYFORM.match(w))


# ---------------------------------------------------------------- nodes ----

class MapNode:
    def __init__(self):
        self.items = []  # list of (key_raw, node)

    def keys(self):
        return [k for k, _ in self.items]


class SeqNode:
    def __init__(self):
        self.items = []


class Scalar:
    def __init__(self, kind, raw, indicator=None):
        self.kind = kind      # plain | quoted | flow | block
        self.raw = raw        # verbatim text (for block: the text after the indicator)
        self.indicator = indicator


class Frame:
    def __init__(self, kind, typ, path, role=None, node=None, parent=None):
        self.kind = kind      # 'map' | 'seq'
        self.typ = typ        # Obj for maps, Seq for seqs
        self.path = path
        self.role = role
        self.node = node
        self.parent = parent  # enclosing map frame (for role rules)
        self.keys = set()


class ParseError(Exception):
    pass


# --------------------------------------------------------------- parser ----

class Parser:
    def __init__(self, text):
        if '\n' in text or '  ' in text:
            raise ParseError('input is expected to be one line with single spaces')
        self.text = text
        self.w = text.split(' ')
        self.n = len(self.w)
        self.i = 0
        self.stack = []

    # -- look-ahead helpers ------------------------------------------------
    def word(self, j):
        return self.w[j] if 0 <= j < self.n else None

    def flow_extent(self, j):
        """If a flow collection starts at word j and ends at a word end,
        return the index after its last word, else None."""
        w0 = self.word(j)
        if w0 is None or w0[0] not in '[{':
            return None
        depth = 0
        quote = None
        k = j
        while k < self.n:
            w = self.w[k]
            pos = 0
            while pos < len(w):
                c = w[pos]
                if quote:
                    if c == '\\' and quote == '"':
                        pos += 1
                    elif c == quote:
                        quote = None
                elif c in '"\'' and (pos == 0 or w[pos - 1] in '[{,: '):
                    quote = c
                elif c in '[{':
                    depth += 1
                elif c in ']}':
                    depth -= 1
                    if depth == 0:
                        if pos == len(w) - 1:
                            return k + 1
                        return None
                pos += 1
            k += 1
        return None

    def quoted_extent(self, j):
        w0 = self.word(j)
        if w0 is None or w0[0] not in '"\'':
            return None
        q = w0[0]
        k = j
        first = True
        while k < self.n:
            w = self.w[k]
            start = 1 if first else 0
            first = False
            pos = start
            while pos < len(w):
                c = w[pos]
                if q == '"' and c == '\\':
                    pos += 2
                    continue
                if c == q:
                    if q == "'" and pos + 1 < len(w) and w[pos + 1] == "'":
                        pos += 2
                        continue
                    return k + 1 if pos == len(w) - 1 else None
                pos += 1
            k += 1
        return None

    def flow_schema_ok(self, j):
        end = self.flow_extent(j)
        if end is None:
            return False
        try:
            v = yaml.safe_load(' '.join(self.w[j:end]))
        except yaml.YAMLError:
            return False
        return isinstance(v, dict) and bool(v) and all(k in SCHEMA_KEYS for k in v)

    def value_ok(self, vt, j, depth=0):
        w = self.word(j)
        if w is None:
            return False
        if vt in (TEXT, ANY):
            return not is_keyform(w) and w != '-'
        if vt == WORD:
            return not is_keyform(w) and w != '-' and w[0] not in '[{|>'
        if vt == BOOL:
            return w in ('true', 'false')
        if vt == NUM:
            return bool(RX_NUM.match(w))
        if vt == FLOWSEQ:
            return w.startswith('[')
        if vt == TYPEVAL:
            return w.startswith('[') or (not is_keyform(w) and w != '-')
        if vt == ENUM:
            return w.startswith('[') or (w == '-' and self.word(j + 1) is not None
                                         and not is_keyform(self.word(j + 1)))
        if vt == SCHEMA_OR_BOOL:
            return w in ('true', 'false') or self.value_ok(SCHEMA, j, depth)
        if isinstance(vt, Seq):
            if vt.flow_ok and w.startswith('['):
                return True
            return w == '-' and self.item_ok(vt.item, j + 1, depth)
        if isinstance(vt, Obj):
            if w[0] == '{':
                return vt.flow_ok and vt is SCHEMA and self.flow_schema_ok(j)
            if not is_keyform(w) or depth > 6:
                return False
            sub = vt.value_type(w[:-1])
            return sub is not None and self.value_ok(sub, j + 1, depth + 1)
        raise AssertionError(vt)

    def item_ok(self, item, j, depth=0):
        w = self.word(j)
        if w is None:
            return False
        if isinstance(item, Obj):
            return self.value_ok(item, j, depth + 1)
        return not is_keyform(w) and w != '-'

    # -- acceptance ----------------------------------------------------------
    def frame_accepts(self, fr, j):
        """Does frame fr accept the token at word j (key or '-')?"""
        w = self.w[j]
        if fr.kind == 'seq':
            return w == '-' and self.item_ok(fr.typ.item, j + 1)
        if not is_keyform(w):
            return False
        key = w[:-1]
        if key in fr.keys:
            return False
        if '$ref' in fr.keys:                                   # R1
            return False
        if fr.typ is SCHEMA:
            if fr.role in ('items', 'additionalProperties') and key in ('description', 'nullable'):
                return False                                    # R2
            if (fr.role == 'param_schema' and key == 'description'
                    and 'description' not in fr.parent.keys):
                return False                                    # R3
        if fr.typ is PROPERTIES:                                # R4
            for anc, names in FORCE_PARENT.items():
                if key in names and fr.path.startswith(anc + '/') and fr.path != anc + '/properties':
                    return False
        vt = fr.typ.value_type(key)
        if vt is None:
            return False
        return self.value_ok(vt, j + 1)

    def acceptor(self, j):
        if j >= self.n:
            return None
        w = self.w[j]
        if w != '-' and not is_keyform(w):
            return None
        for idx in range(len(self.stack) - 1, -1, -1):
            if self.frame_accepts(self.stack[idx], j):
                return idx
        return None

    def fail(self, msg):
        ctx = ' '.join(self.w[max(0, self.i - 12):self.i + 12])
        path = self.stack[-1].path if self.stack else ''
        raise ParseError(f'{msg} at word {self.i} ({path}): ...{ctx}...')

    # -- scalar readers -------------------------------------------------------
    def read_text_run(self):
        start = self.i
        j = start
        while j < self.n and self.acceptor(j) is None:
            j += 1
        if j == start:
            self.fail('empty scalar')
        self.i = j
        return ' '.join(self.w[start:j])

    def read_scalar(self, vt):
        w = self.w[self.i]
        if w[0] in '[{':
            end = self.flow_extent(self.i)
            if end is None:
                self.fail('unbalanced flow collection')
            raw = ' '.join(self.w[self.i:end])
            self.i = end
            yaml.safe_load(raw)  # must be valid YAML
            return Scalar('flow', raw)
        if w[0] in '"\'':
            end = self.quoted_extent(self.i)
            if end is None:
                self.fail('unterminated quoted scalar')
            raw = ' '.join(self.w[self.i:end])
            self.i = end
            return Scalar('quoted', raw)
        if w in BLOCK_INDICATORS:
            if vt != TEXT:
                self.fail('block scalar for non-text value')
            self.i += 1
            return Scalar('block', self.read_text_run(), indicator=w)
        if vt in (TEXT, ANY, TYPEVAL):
            return Scalar('plain', self.read_text_run())
        # single word
        self.i += 1
        return Scalar('plain', w)

    # -- structure readers ----------------------------------------------------
    def parse_value(self, vt, path, role, parent):
        w = self.word(self.i)
        if w is None:
            self.fail('missing value')
        if isinstance(vt, Obj):
            if w[0] == '{':
                return self.read_scalar(ANY)
            return self.parse_map(vt, path, role, parent)
        if isinstance(vt, Seq):
            if w.startswith('['):
                return self.read_scalar(FLOWSEQ)
            return self.parse_seq(vt, path, parent)
        if vt == ENUM:
            if w.startswith('['):
                return self.read_scalar(FLOWSEQ)
            return self.parse_seq(Seq(WORD), path, parent)
        if vt == SCHEMA_OR_BOOL:
            if w in ('true', 'false'):
                return self.read_scalar(BOOL)
            return self.parse_value(SCHEMA, path, role, parent)
        return self.read_scalar(vt)

    def parse_map(self, typ, path, role=None, parent=None):
        node = MapNode()
        fr = Frame('map', typ, path, role, node, parent)
        self.stack.append(fr)
        while self.i < self.n:
            acc = self.acceptor(self.i)
            if acc is None:
                self.fail(f'no open object accepts {self.w[self.i]!r}')
            if acc != len(self.stack) - 1:
                break
            key = self.w[self.i][:-1]
            fr.keys.add(key)
            self.i += 1
            vt = typ.value_type(key)
            sub_role = None
            if typ is SCHEMA and key in ('items', 'additionalProperties'):
                sub_role = key
            elif typ is PARAMETER and key == 'schema':
                sub_role = 'param_schema'
            val = self.parse_value(vt, f'{path}/{key}' if path else key, sub_role, fr)
            node.items.append((key, val))
        self.stack.pop()
        if not node.items:
            self.fail('empty mapping')
        return node

    def parse_seq(self, typ, path, parent):
        node = SeqNode()
        fr = Frame('seq', typ, path, None, node, parent)
        self.stack.append(fr)
        while self.i < self.n:
            acc = self.acceptor(self.i)
            if acc is None:
                self.fail(f'no open object accepts {self.w[self.i]!r}')
            if acc != len(self.stack) - 1:
                break
            self.i += 1  # '-'
            ipath = f'{path}/{len(node.items)}'
            if isinstance(typ.item, Obj):
                node.items.append(self.parse_value(typ.item, ipath, None, fr))
            else:
                node.items.append(self.read_scalar(typ.item))
        self.stack.pop()
        return node

    def parse(self):
        root = self.parse_map(ROOT, '')
        if self.i != self.n:
            self.fail('trailing input')
        return root


# -------------------------------------------------------------- emitter ----

WRAP = 100


def plain_ok(raw):
    """Is raw safe to emit as a plain scalar in block context, loading back
    to the same string?"""
    try:
        v = yaml.safe_load('k: ' + raw)
    except yaml.YAMLError:
        return False
    return isinstance(v, dict) and v.get('k') == raw


def emit_block(lines, ind, key_prefix, text):
    lines.append(f'{key_prefix}>')
    width = max(40, WRAP - len(ind) - 2)
    for ln in textwrap.wrap(text, width=width, break_long_words=False,
                            break_on_hyphens=False):
        lines.append(f'{ind}  {ln}')


def emit_scalar_entry(lines, ind, key_prefix, sc):
    if sc.kind == 'block':
        emit_block(lines, ind, key_prefix, sc.raw)
    elif sc.kind == 'plain' and not plain_ok(sc.raw) and not RX_NUM.match(sc.raw) \
            and sc.raw not in ('true', 'false', 'null'):
        # not representable as a plain scalar: fold it instead
        emit_block(lines, ind, key_prefix, sc.raw)
    else:
        lines.append(f'{key_prefix}{sc.raw}')


def emit_map(lines, node, ind, blank_between=False, first_prefix=None):
    for n, (key, val) in enumerate(node.items):
        if blank_between and n > 0:
            lines.append('')
        prefix = first_prefix if (n == 0 and first_prefix is not None) else ind
        kp = f'{prefix}{key}: '
        if isinstance(val, Scalar):
            emit_scalar_entry(lines, ind, kp, val)
        elif isinstance(val, MapNode):
            lines.append(f'{prefix}{key}:')
            blank = key in ('paths', 'schemas', 'responses', 'securitySchemes',
                            'parameters') and ind in ('', '  ') and isinstance(val, MapNode)
            emit_map(lines, val, ind + '  ', blank_between=blank)
        else:
            lines.append(f'{prefix}{key}:')
            emit_seq(lines, val, ind + '  ')


def emit_seq(lines, node, ind):
    for it in node.items:
        if isinstance(it, Scalar):
            emit_scalar_entry(lines, ind, f'{ind}- ', it)
        elif isinstance(it, MapNode):
            emit_map(lines, it, ind + '  ', first_prefix=f'{ind}- ')
        else:
            raise AssertionError('nested sequence')


def emit(root):
    lines = []
    for n, (key, val) in enumerate(root.items):
        sub = MapNode()
        sub.items = [(key, val)]
        if key in ('servers', 'security', 'paths', 'components') and lines:
            lines.append('')
        if key == 'components':
            lines.append('components:')
            for m, (ck, cv) in enumerate(val.items):
                if m:
                    lines.append('')
                sub2 = MapNode()
                sub2.items = [(ck, cv)]
                emit_map(lines, sub2, '  ')
            continue
        if key == 'paths':
            lines.append('paths:')
            emit_map(lines, val, '  ', blank_between=True)
            continue
        emit_map(lines, sub, '')
    return '\n'.join(lines) + '\n'


def main(argv):
    src = argv[1] if len(argv) > 1 else DEFAULT_IN
    dst = argv[2] if len(argv) > 2 else DEFAULT_OUT
    with open(src, encoding='utf-8') as f:
        text = f.read().strip()
    root = Parser(text).parse()
    out = emit(root)
    yaml.safe_load(out)
    with open(dst, 'w', encoding='utf-8') as f:
        f.write(out)
    print(f'wrote {dst} ({len(out.splitlines())} lines)')


if __name__ == '__main__':
    main(sys.argv)
