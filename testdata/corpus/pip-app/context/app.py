import idna
import six


def greeting():
    return "hello %s from %s" % (six.text_type("pip"), idna.encode("bücher.example").decode())


if __name__ == "__main__":
    print(greeting())
