//! A restricted pickle machine for the `data.pkl` of a `torch.save`d state_dict.
//!
//! Python's unpickler imports and calls whatever the stream names, which is
//! how a checkpoint can run code. This one only *describes* objects: the few
//! globals a state_dict needs are mapped to [`Global`] markers, every other
//! global is refused by name before anything else happens, and "calling" an
//! allowed global just records its arguments. Nothing is ever executed.
//!
//! The machine also bounds what a hostile stream can make it do: lengths are
//! checked against the bytes left before allocating, nesting is limited (so
//! dropping a value cannot overflow the stack), and a container cannot be
//! changed once it sits inside another one (so no cycles, and the recorded
//! nesting depth stays exact). Streams written by `torch.save` never do that:
//! pickle fills a container before using it.
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use tch::Kind;

/// Deeper than any state_dict (which nests about 4 levels) and far below
/// what recursive drops can handle.
const MAX_DEPTH: u32 = 256;

/// The globals a state_dict pickle may name; anything else is refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    /// `torch.FloatStorage` and friends: only ever a tag inside a storage's
    /// persistent id, naming the element type.
    Storage(Kind),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Result<Global, String> {
        let storage = |k| Ok(Global::Storage(k));
        match (module, name) {
            ("collections", "OrderedDict") => Ok(Global::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
            ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
            ("torch._utils", "_rebuild_parameter_with_state") => Ok(Global::RebuildParameterWithState),
            ("torch", "FloatStorage") => storage(Kind::Float),
            ("torch", "HalfStorage") => storage(Kind::Half),
            ("torch", "BFloat16Storage") => storage(Kind::BFloat16),
            ("torch", "DoubleStorage") => storage(Kind::Double),
            ("torch", "LongStorage") => storage(Kind::Int64),
            ("torch", "IntStorage") => storage(Kind::Int),
            ("torch", "ShortStorage") => storage(Kind::Int16),
            ("torch", "CharStorage") => storage(Kind::Int8),
            ("torch", "ByteStorage") => storage(Kind::Uint8),
            ("torch", "BoolStorage") => storage(Kind::Bool),
            _ => Err(format!(
                "refused global `{module}.{name}`: only the tensors of a state_dict can be read \
                 (a pickled module or arbitrary object needs Python; save `model.state_dict()` instead)"
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Global::OrderedDict => "collections.OrderedDict",
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2",
            Global::RebuildParameter => "torch._utils._rebuild_parameter",
            Global::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state",
            Global::Storage(_) => "torch storage type",
        }
    }
}

/// One storage reference: `('storage', torch.XStorage, key, location, numel)`.
#[derive(Debug)]
pub(super) struct StorageRef {
    /// Names the archive entry `data/<key>`.
    pub key: String,
    pub kind: Kind,
    /// Elements of `kind` in the storage.
    pub numel: i64,
}

/// What `_rebuild_tensor_v2` would build: a view into a storage.
#[derive(Debug)]
pub(super) struct TensorRef {
    pub storage: StorageRef,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

#[derive(Debug)]
pub(super) struct List {
    items: Vec<Value>,
    depth: u32,
    frozen: bool,
}

#[derive(Debug)]
pub(super) struct Dict {
    pub ordered: bool,
    pub entries: Vec<(Value, Value)>,
    /// Where each string key sits in `entries`, so SETITEM on an existing key
    /// replaces it as Python would.
    index: HashMap<Rc<str>, usize>,
    depth: u32,
    frozen: bool,
}

#[derive(Debug)]
pub(super) struct Tuple {
    pub items: Vec<Value>,
    depth: u32,
}

#[derive(Debug, Clone)]
pub(super) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// Floats and bytes can appear in a pickle but carry nothing a
    /// state_dict's tensors need, so only their type is kept.
    Float,
    Str(Rc<str>),
    Bytes,
    Tuple(Rc<Tuple>),
    List(Rc<RefCell<List>>),
    Dict(Rc<RefCell<Dict>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    /// The Python type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(d) if d.borrow().ordered => "OrderedDict",
            Value::Dict(_) => "dict",
            Value::Global(_) => "class or function",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    /// The type name with its article, for messages: "an int", "a list".
    pub fn a_type(&self) -> String {
        let name = self.type_name();
        if let Value::None = self {
            return name.to_string();
        }
        let article = if name.starts_with(['a', 'e', 'i', 'o', 'u', 'O']) {
            "an"
        } else {
            "a"
        };
        format!("{article} {name}")
    }

    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(t) => t.depth,
            Value::List(l) => l.borrow().depth,
            Value::Dict(d) => d.borrow().depth,
            _ => 0,
        }
    }

    /// Marks a container as placed inside another one (see module docs).
    fn freeze(&self) {
        match self {
            Value::List(l) => l.borrow_mut().frozen = true,
            Value::Dict(d) => d.borrow_mut().frozen = true,
            _ => {}
        }
    }

    fn new_dict(ordered: bool) -> Value {
        Value::Dict(Rc::new(RefCell::new(Dict {
            ordered,
            entries: Vec::new(),
            index: HashMap::new(),
            depth: 1,
            frozen: false,
        })))
    }

    fn new_list(items: Vec<Value>) -> Result<Value, String> {
        let depth = child_depth(&items)?;
        Ok(Value::List(Rc::new(RefCell::new(List {
            items,
            depth,
            frozen: false,
        }))))
    }

    fn new_tuple(items: Vec<Value>) -> Result<Value, String> {
        let depth = child_depth(&items)?;
        Ok(Value::Tuple(Rc::new(Tuple { items, depth })))
    }
}

/// Depth of a container holding `items`; freezes them, since they are now
/// inside it.
fn child_depth(items: &[Value]) -> Result<u32, String> {
    let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
    if depth > MAX_DEPTH {
        return Err(format!("objects nested more than {MAX_DEPTH} levels deep"));
    }
    items.iter().for_each(Value::freeze);
    Ok(depth)
}

/// Runs the pickle in `data` to its STOP and returns the object it built.
/// Errors say what went wrong and at which byte offset.
pub(super) fn unpickle(data: &[u8]) -> Result<Value, String> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    loop {
        let at = m.pos;
        let op = m.u8().map_err(|e| format!("{e} (no STOP opcode)"))?;
        match m.step(op) {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => return Err(format!("at byte {at} (opcode {}): {e}", describe(op))),
        }
    }
}

fn describe(op: u8) -> String {
    if op.is_ascii_graphic() {
        format!("0x{op:02x} '{}'", op as char)
    } else {
        format!("0x{op:02x}")
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(format!(
                "unexpected end of data: needs {n} more bytes, {left} left"
            ));
        }
        let bytes = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn len_u64(&mut self) -> Result<usize, String> {
        usize::try_from(u64::from_le_bytes(self.array()?))
            .map_err(|_| "length does not fit in memory".to_string())
    }

    /// A newline-terminated line (the text arguments of GLOBAL).
    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unexpected end of data: unterminated line")?;
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end]).map_err(|_| "line is not UTF-8".to_string())
    }

    fn utf8(&mut self, n: usize) -> Result<Value, String> {
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| "string is not valid UTF-8".to_string())?;
        Ok(Value::Str(s.into()))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Result<Value, String> {
        // A MARK above the top means the stream pops into a marked region.
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("stack underflow (pop past MARK)".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "stack underflow".to_string())
    }

    fn top(&self) -> Result<&Value, String> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("stack underflow (top past MARK)".into());
        }
        self.stack
            .last()
            .ok_or_else(|| "stack underflow".to_string())
    }

    /// The items pushed since the last MARK.
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self.marks.pop().ok_or("no MARK on the stack")?;
        Ok(self.stack.split_off(mark))
    }

    fn memo_get(&self, i: u32) -> Result<Value, String> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("memo entry {i} was never stored"))
    }

    fn memo_put(&mut self, i: u32) -> Result<(), String> {
        let v = self.top()?.clone();
        self.memo.insert(i, v);
        Ok(())
    }

    /// Executes one opcode; returns the result on STOP.
    fn step(&mut self, op: u8) -> Result<Option<Value>, String> {
        match op {
            0x80 => {
                // PROTO
                let v = self.u8()?;
                if v > 5 {
                    return Err(format!("pickle protocol {v} is newer than 5"));
                }
            }
            0x95 => {
                // FRAME: a length prefix for buffered reading; the framed
                // opcodes follow inline.
                self.take(8)?;
            }
            b'.' => return self.pop().map(Some),
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.push(v);
            }
            b'N' => self.push(Value::None),
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.push(Value::Int(v.into()));
            }
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v.into()));
            }
            b'M' => {
                let v = u16::from_le_bytes(self.array()?);
                self.push(Value::Int(v.into()));
            }
            0x8a => {
                // LONG1: little-endian two's complement, n bytes.
                let n = self.u8()? as usize;
                let bytes = self.take(n)?;
                self.push(Value::Int(long_le(bytes)?));
            }
            b'G' => {
                self.take(8)?;
                self.push(Value::Float);
            }
            b'X' => {
                let n = self.u32()? as usize;
                let v = self.utf8(n)?;
                self.push(v);
            }
            0x8c => {
                let n = self.u8()? as usize;
                let v = self.utf8(n)?;
                self.push(v);
            }
            0x8d => {
                let n = self.len_u64()?;
                let v = self.utf8(n)?;
                self.push(v);
            }
            b'C' | b'B' | 0x8e => {
                let n = match op {
                    b'C' => self.u8()? as usize,
                    b'B' => self.u32()? as usize,
                    _ => self.len_u64()?,
                };
                self.take(n)?;
                self.push(Value::Bytes);
            }
            b')' => self.push(Value::new_tuple(Vec::new())?),
            b't' => {
                let items = self.pop_mark()?;
                self.push(Value::new_tuple(items)?);
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push(Value::new_tuple(items)?);
            }
            b']' => self.push(Value::new_list(Vec::new())?),
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Value::new_list(items)?);
            }
            b'a' => {
                let item = self.pop()?;
                self.append(vec![item])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b'}' => self.push(Value::new_dict(false)),
            b'd' => {
                let items = self.pop_mark()?;
                let dict = Value::new_dict(false);
                self.push(dict);
                self.set_items(items)?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.set_items(vec![key, value])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            b'q' => {
                let i = self.u8()?;
                self.memo_put(i.into())?;
            }
            b'r' => {
                let i = self.u32()?;
                self.memo_put(i)?;
            }
            0x94 => {
                // MEMOIZE: the next free index.
                let i = u32::try_from(self.memo.len()).map_err(|_| "memo too large")?;
                self.memo_put(i)?;
            }
            b'h' => {
                let i = self.u8()?;
                let v = self.memo_get(i.into())?;
                self.push(v);
            }
            b'j' => {
                let i = self.u32()?;
                let v = self.memo_get(i)?;
                self.push(v);
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push(Value::Global(Global::resolve(module, name)?));
            }
            0x93 => {
                // STACK_GLOBAL
                let name = self.pop()?;
                let module = self.pop()?;
                match (&module, &name) {
                    (Value::Str(m), Value::Str(n)) => {
                        self.push(Value::Global(Global::resolve(m, n)?))
                    }
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                }
            }
            b'R' | 0x81 => {
                // REDUCE calls, NEWOBJ constructs: the same to us, since an
                // allowed global only ever records its arguments.
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = call(callable, args)?;
                self.push(v);
            }
            b'Q' => {
                let pid = self.pop()?;
                let storage = persistent_load(&pid)?;
                self.push(Value::Storage(Rc::new(storage)));
            }
            b'b' => {
                // BUILD: the state of an OrderedDict is its attributes, i.e.
                // a state_dict's `_metadata` (version numbers of each module),
                // which tensors do not need.
                let _state = self.pop()?;
                match self.top()? {
                    Value::Dict(_) => {}
                    other => {
                        return Err(format!(
                            "BUILD on {} is not part of a state_dict",
                            other.a_type()
                        ))
                    }
                }
            }
            _ => return Err("unsupported opcode".into()),
        }
        Ok(None)
    }

    fn append(&mut self, items: Vec<Value>) -> Result<(), String> {
        let Value::List(list) = self.top()?.clone() else {
            return Err(format!("APPEND to {}", self.top()?.a_type()));
        };
        let depth = child_depth(&items)?;
        let mut l = list.borrow_mut();
        if l.frozen {
            return Err("list changed after it was stored in another object".into());
        }
        l.depth = l.depth.max(depth);
        l.items.extend(items);
        Ok(())
    }

    /// SETITEM(S): `items` alternates keys and values.
    fn set_items(&mut self, items: Vec<Value>) -> Result<(), String> {
        if !items.len().is_multiple_of(2) {
            return Err("odd number of items for SETITEMS".into());
        }
        let Value::Dict(dict) = self.top()?.clone() else {
            return Err(format!("SETITEM on {}", self.top()?.a_type()));
        };
        // Depth of the dict, counting its new contents.
        let depth = child_depth(&items)?;
        let mut d = dict.borrow_mut();
        if d.frozen {
            return Err("dict changed after it was stored in another object".into());
        }
        d.depth = d.depth.max(depth);
        let mut it = items.into_iter();
        while let (Some(key), Some(value)) = (it.next(), it.next()) {
            let existing = match &key {
                Value::Str(s) => d.index.get(s).copied(),
                _ => None,
            };
            match existing {
                Some(i) => d.entries[i].1 = value,
                None => {
                    if let Value::Str(s) = &key {
                        let i = d.entries.len();
                        d.index.insert(s.clone(), i);
                    }
                    d.entries.push((key, value));
                }
            }
        }
        Ok(())
    }
}

/// Python's `long` from LONG1's little-endian two's-complement bytes.
fn long_le(bytes: &[u8]) -> Result<i64, String> {
    if bytes.is_empty() {
        return Ok(0);
    }
    if bytes.len() > 8 {
        // Longer encodings are valid only if the extra bytes are sign fill.
        let (low, high) = bytes.split_at(8);
        let fill = if low[7] & 0x80 != 0 { 0xff } else { 0 };
        if high.iter().any(|&b| b != fill) {
            return Err("integer does not fit in 64 bits".into());
        }
        return long_le(low);
    }
    let fill = if bytes[bytes.len() - 1] & 0x80 != 0 {
        0xff
    } else {
        0
    };
    let mut buf = [fill; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    Ok(i64::from_le_bytes(buf))
}

fn call(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Global(global) = callable else {
        return Err(format!("calling {}", callable.a_type()));
    };
    let Value::Tuple(args) = args else {
        return Err(format!(
            "{} called with {} instead of an argument tuple",
            global.name(),
            args.a_type()
        ));
    };
    let args = &args.items;
    match global {
        Global::OrderedDict if args.is_empty() => Ok(Value::new_dict(true)),
        Global::RebuildTensorV2 => rebuild_tensor(args).map(|t| Value::Tensor(Rc::new(t))),
        Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
            // (data, requires_grad, backward_hooks[, state]): the tensor is
            // all a state_dict needs.
            Some(Value::Tensor(t)) => Ok(Value::Tensor(t.clone())),
            _ => Err(format!(
                "{} without a tensor as first argument",
                global.name()
            )),
        },
        _ => Err(format!(
            "{} called with {} arguments, unlike a state_dict",
            global.name(),
            args.len()
        )),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
/// backward_hooks[, metadata])`.
fn rebuild_tensor(args: &[Value]) -> Result<TensorRef, String> {
    if !(6..=7).contains(&args.len()) {
        return Err(format!(
            "_rebuild_tensor_v2 called with {} arguments, expected 6 or 7",
            args.len()
        ));
    }
    let Value::Storage(storage) = &args[0] else {
        return Err(format!(
            "_rebuild_tensor_v2: first argument is {}, not a storage",
            args[0].a_type()
        ));
    };
    let Value::Int(offset) = args[1] else {
        return Err(format!(
            "_rebuild_tensor_v2: storage offset is {}",
            args[1].a_type()
        ));
    };
    let ints = |v: &Value, what: &str| -> Result<Vec<i64>, String> {
        let Value::Tuple(t) = v else {
            return Err(format!(
                "_rebuild_tensor_v2: {what} is {}, not a tuple",
                v.a_type()
            ));
        };
        t.items
            .iter()
            .map(|x| match x {
                Value::Int(i) => Ok(*i),
                other => Err(format!(
                    "_rebuild_tensor_v2: {what} holds {}",
                    other.a_type()
                )),
            })
            .collect()
    };
    let Value::Bool(_requires_grad) = args[4] else {
        return Err(format!(
            "_rebuild_tensor_v2: requires_grad is {}",
            args[4].a_type()
        ));
    };
    let storage = StorageRef {
        key: storage.key.clone(),
        kind: storage.kind,
        numel: storage.numel,
    };
    Ok(TensorRef {
        storage,
        offset,
        size: ints(&args[2], "size")?,
        stride: ints(&args[3], "stride")?,
    })
}

/// torch.save's persistent id for a storage:
/// `('storage', torch.XStorage, key, location, numel)`.
fn persistent_load(pid: &Value) -> Result<StorageRef, String> {
    let bad = || {
        format!(
            "persistent id ({}) is not ('storage', type, key, location, numel)",
            pid.a_type()
        )
    };
    let Value::Tuple(t) = pid else {
        return Err(bad());
    };
    match t.items.as_slice() {
        [Value::Str(tag), Value::Global(Global::Storage(kind)), Value::Str(key), Value::Str(_location), Value::Int(numel)]
            if &**tag == "storage" =>
        {
            Ok(StorageRef {
                key: key.to_string(),
                kind: *kind,
                numel: *numel,
            })
        }
        _ => Err(bad()),
    }
}

/// The `(name, tensor)` entries of a state_dict, in file order.
/// The value under the string key `key` of a top-level dict, if there is one
/// (a training checkpoint's `{"epoch": .., "state_dict": {..}}`).
pub(super) fn dict_entry(top: &Value, key: &str) -> Option<Value> {
    let Value::Dict(dict) = top else { return None };
    let dict = dict.borrow();
    dict.entries.iter().find_map(|(k, v)| match k {
        Value::Str(name) if &**name == key => Some(v.clone()),
        _ => None,
    })
}

pub(super) fn state_dict_entries(top: &Value) -> Result<Vec<(String, Rc<TensorRef>)>, String> {
    let Value::Dict(dict) = top else {
        return Err(format!(
            "not a state_dict: top-level object is {}",
            top.a_type()
        ));
    };
    let dict = dict.borrow();
    dict.entries
        .iter()
        .map(|(k, v)| {
            let Value::Str(name) = k else {
                return Err(format!(
                    "not a state_dict: a key is {}, not a str",
                    k.a_type()
                ));
            };
            match v {
                Value::Tensor(t) => Ok((name.to_string(), t.clone())),
                other => Err(format!(
                    "not a state_dict: entry `{name}` is {}, not a tensor",
                    other.a_type()
                )),
            }
        })
        .collect()
}
