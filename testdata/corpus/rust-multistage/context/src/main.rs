fn main() {
    let mut buf = itoa::Buffer::new();
    println!("hello from rust, {} crates", buf.format(1u32));
}
