FROM alpine
RUN <<EOF
apk add curl
echo done
EOF
RUN python3 <<PY > /out.txt
print("hi")
PY
RUN <<A cat > /a && <<B cat > /b
alpha
A
beta
B
RUN 3<<FD cat /dev/fd/3
three
FD
RUN <<-"SCRIPT"
	#!/bin/sh
	echo $HOME
	SCRIPT
COPY <<one <<"two" /dst/
content $X
one
raw $X
two
